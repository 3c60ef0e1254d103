"""The serving install an edge device gets (`pip install 'quorum[cpu]'`): ONNX Runtime's CPU wheel and no
torch, serving a bundle from a real process. `make test-serving` runs this in such a venv and sets
QUORUM_SERVING_INSTALL=cpu, which also checks the wheels installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.processes import request, start_quorum

CPU_INSTALL = os.environ.get("QUORUM_SERVING_INSTALL") == "cpu"


@pytest.mark.skipif(not CPU_INSTALL, reason="checks the CPU-only serving venv of `make test-serving`")
def test_the_cpu_serving_install_has_the_cpu_wheel_and_no_torch():
    assert importlib.metadata.version("onnxruntime") == ort.__version__
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("onnxruntime-gpu")  # both wheels install one module: never together
    assert importlib.util.find_spec("torch") is None
    assert "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.mark.slow
def test_a_served_bundle_answers_a_request(bundle_dir: Path, test_images):
    proc, base = start_quorum("serve", bundle_dir, QUORUM_DEVICE="auto")
    try:
        x, y = test_images[0][:8], test_images[1][:8]
        status, body = request(f"{base}/predict?budget=8", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200, body
        labels = np.array([p["label"] for p in body["predictions"]])
        assert len(labels) == 8 and (labels == y).mean() >= 0.5
        status, info = request(f"{base}/")
        assert status == 200 and "CPUExecutionProvider" in json.dumps(info)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
