"""Reduced-precision bundles (`quorum quantize`, `quorum export --precision`) on the built 40-module bundle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from quorum.exporter.errors import ExportError
from quorum.exporter.quantize import QuantizeConfig, quantize_bundle
from quorum.runtime.engine import Engine
from quorum.runtime.manifest import Manifest

pytestmark = pytest.mark.slow  # each bundle quantized reads the dataset and evaluates every module on it


def _size(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def int8_bundle(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "int8"
    quantize_bundle(bundle_dir, out, QuantizeConfig(data_dir=str(data_dir)), progress=False)
    return out


def test_an_int8_bundle_is_a_third_of_the_fp32_bytes_and_records_its_accuracy(int8_bundle: Path, bundle_dir: Path):
    m = Manifest.load(int8_bundle)
    assert m.precision is not None and m.precision.dtype == "int8" and m.precision.source == bundle_dir.name
    assert [a.budget for a in m.precision.accuracy] == [1, 8, 32, 40]  # the standard budgets up to M, and M = 40
    for a in m.precision.accuracy:
        assert a.fp32 - a.modules <= m.precision.tolerance / 100 and a.packed == pytest.approx(a.modules, abs=2e-4)
        assert 0.3 < a.modules <= 1
    # int8 weights: a quarter of the float bytes, plus the graphs' structure
    assert _size(int8_bundle) < 0.35 * _size(bundle_dir)
    proto = onnx.load(int8_bundle / m.modules[0].file)
    weights = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept


def test_the_runtime_verifies_the_int8_packed_graph_against_the_int8_modules(int8_bundle: Path, test_images):
    x, y = test_images[0][:500], test_images[1][:500]
    packed = Engine.load(int8_bundle)
    isolated = Engine.load(int8_bundle, executor="isolated")
    try:
        assert packed.bundle.packed is not None, packed.bundle.packed_note
        a, b = packed.predict(x, budget=32), isolated.predict(x, budget=32)
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        assert (a.labels == y).mean() > 0.6
    finally:
        packed.close()
        isolated.close()


def test_int8_predictions_stay_close_to_fp32(int8_bundle: Path, bundle_dir: Path, test_images):
    x = test_images[0][:1000]
    fp32, int8 = Engine.load(bundle_dir), Engine.load(int8_bundle)
    try:
        a, b = fp32.predict(x, budget=32), int8.predict(x, budget=32)
        assert (a.labels == b.labels).mean() > 0.98
        assert np.abs(a.probabilities - b.probabilities).max() < 0.2
    finally:
        fp32.close()
        int8.close()


def test_an_fp16_bundle_keeps_float32_inputs_and_verifies(bundle_dir: Path, tmp_path: Path, data_dir: Path):
    out = tmp_path / "fp16"
    m = quantize_bundle(bundle_dir, out, QuantizeConfig(precision="fp16", data_dir=str(data_dir)), progress=False)
    assert m.precision is not None and m.precision.dtype == "fp16"
    proto = onnx.load(out / m.modules[0].file)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    engine = Engine.load(out)
    try:
        assert engine.bundle.packed is not None, engine.bundle.packed_note
    finally:
        engine.close()


def test_a_bundle_that_loses_accuracy_is_refused_with_the_numbers(bundle_dir: Path, tmp_path: Path, data_dir: Path):
    # static int8 activations calibrated on one image clip most of what the others need
    cfg = QuantizeConfig(method="static", calibration=1, tolerance=0.5, data_dir=str(data_dir))
    with pytest.raises(ExportError, match=r"loses .* points .* tolerance of 0.5 \(budget 1: fp32 .*budget 32") as e:
        quantize_bundle(bundle_dir, tmp_path / "bad", cfg, progress=False)
    assert "nothing was written" in str(e.value)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_a_static_int8_bundle_serves_without_a_packed_graph(bundle_dir: Path, tmp_path: Path, data_dir: Path):
    cfg = QuantizeConfig(method="static", tolerance=5, data_dir=str(data_dir))
    m = quantize_bundle(bundle_dir, tmp_path / "static", cfg, progress=False)
    assert m.packed is None and m.precision is not None and "calibrated" in m.precision.method
    engine = Engine.load(tmp_path / "static")
    try:
        assert engine.bundle.packed is None and len(engine.bundle.sessions) == 40
    finally:
        engine.close()


def test_a_quantized_bundle_is_not_quantized_again(int8_bundle: Path, tmp_path: Path):
    with pytest.raises(ExportError, match="already int8; quantize its FP32 source"):
        quantize_bundle(int8_bundle, tmp_path / "again", QuantizeConfig(), progress=False)


def test_quorum_quantize_writes_the_bundle_and_prints_the_table(bundle_dir: Path, tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(bundle_dir, src)
    cmd = [sys.executable, "-m", "quorum", "quantize", str(src), "--out", str(tmp_path / "q"), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "budget   32: fp32" in out.stdout and Manifest.load(tmp_path / "q").precision is not None
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_quorum_export_precision_int8_writes_only_the_int8_bundle(run_dir: Path, tmp_path: Path):
    out = tmp_path / "nested" / "int8"
    cmd = [sys.executable, "-m", "quorum", "export", str(run_dir), "--out", str(out), "--precision", "int8", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    m = Manifest.load(out)
    assert m.precision is not None and m.precision.dtype == "int8" and m.packed is not None
    assert "40 int8 modules" in done.stdout and "budget   32: fp32" in done.stdout
    assert [p.name for p in out.parent.iterdir()] == ["int8"]  # the FP32 export in between is gone
