"""Every architecture of the registry, end to end on tiny sizes: `quorum train --arch …`, export
(parity with torch), the runtime (a TreeNet's trunk once, then the budgeted branches), and a
real uvicorn answering /predict?budget=… on real Fashion-MNIST images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quorum.runtime.engine import Engine
from quorum.runtime.errors import BundleError
from quorum.runtime.manifest import Manifest
from quorum.trainer.evaluate import module_logits
from quorum.trainer.run import load_best
from quorum.trainer.train import load_data
from tests.bundles import CONV_SIZES

pytestmark = pytest.mark.slow


@pytest.fixture(params=sorted(CONV_SIZES))
def exported(request, arch_bundle) -> tuple[str, Path, Path]:
    """(arch, run, bundle), trained once per session (shared with test_e2e.py)."""
    return (request.param, *arch_bundle(request.param))


def test_export_matches_torch_and_the_runtime_matches_export(exported, test_images):
    arch, run_dir, bundle = exported
    m = Manifest.load(bundle)
    assert m.training.arch == arch and m.input.shape == [1, 28, 28]
    assert all(e.parity <= 1e-4 for e in m.modules)
    assert (m.trunk is not None) == (arch == "treenet")
    if m.trunk is not None:
        assert m.trunk.parity <= 1e-4 and (bundle / m.trunk.file).is_file()
    engine = Engine.load(bundle, device="cpu")
    try:
        assert engine.executor == "isolated" and len(engine.healthy_ids) == 3
        x_raw = test_images[0][:64].reshape(-1, 1, 28, 28)
        run = load_best(run_dir)
        x = run.norm.apply(torch.from_numpy(x_raw))
        expected = module_logits(run.model, x).numpy()  # (N, M, K) from torch
        got = engine.module_logits(x_raw)  # every module through ONNX Runtime (and the trunk)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        p = engine.predict(x_raw, budget=2)
        assert p.used == m.anytime_order[:2] and not p.degraded
        mean = expected[:, m.anytime_order[:2]].mean(axis=1)
        np.testing.assert_array_equal(p.labels, mean.argmax(axis=1))
    finally:
        engine.close()


def test_the_data_takes_the_shape_the_architecture_takes(exported):
    _, run_dir, _ = exported
    cfg = load_best(run_dir).config
    data, in_shape = load_data(cfg)
    assert in_shape == (1, 28, 28) and data.val.x.shape[1:] == (1, 28, 28)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["val_oracle_accuracy"] > 0


@pytest.mark.parametrize("exported", ["treenet"], indirect=True)  # only a TreeNet has a shared trunk
def test_a_corrupt_trunk_refuses_the_bundle(exported, tmp_path: Path):
    _, _, bundle = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = (copy / "trunk.onnx").read_bytes()
    (copy / "trunk.onnx").write_bytes(data[:-10] + bytes(10))
    with pytest.raises(BundleError, match="every module needs the shared trunk"):
        Engine.load(copy, device="cpu")
