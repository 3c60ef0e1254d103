"""Serving on ONNX Runtime's CUDA execution provider answers what the CPU answers. Skipped where the
CUDA provider cannot load (no NVIDIA driver, or the CPU wheel of ONNX Runtime); `bench/gpu.sh`
runs it on a GPU host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.runtime.engine import Engine
from quorum.runtime.providers import CUDA, requested_providers

pytestmark = pytest.mark.skipif(CUDA not in requested_providers("auto"), reason="no CUDA execution provider here")

# CUDA's GEMMs sum in another order (and may use TF32): probabilities agree to 1e-3, labels almost always
PROB_ATOL = 1e-3


@pytest.mark.parametrize("executor", ["packed", "isolated"])
def test_cuda_serving_matches_the_cpu(bundle_dir: Path, test_images, executor: str):
    x = test_images[0][:256]
    cpu = Engine.load(bundle_dir, device="cpu", executor=executor)  # type: ignore[arg-type]
    gpu = Engine.load(bundle_dir, device="cuda", executor=executor)  # type: ignore[arg-type]
    try:
        assert gpu.providers[0] == CUDA and cpu.providers == ["CPUExecutionProvider"]
        for budget in (1, 8, 32, 40):
            for batch in (x[:1], x):
                a, b = cpu.predict(batch, budget=budget), gpu.predict(batch, budget=budget)
                assert a.used == b.used
                np.testing.assert_allclose(b.probabilities, a.probabilities, rtol=0, atol=PROB_ATOL)
                assert (a.labels == b.labels).mean() >= 0.99
    finally:
        cpu.close()
        gpu.close()
