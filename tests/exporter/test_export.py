from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from quorum.exporter.errors import ExportError
from quorum.exporter.export import export_run
from quorum.runtime.manifest import SCHEMA_VERSION, Manifest
from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import RunDirError
from quorum.trainer.run import load_best, load_run
from quorum.trainer.train import train


def test_manifest_describes_every_module(exported_bundle: Path, run_dir: Path):
    m = Manifest.load(exported_bundle)
    assert m.format == "quorum-bundle" and m.version == SCHEMA_VERSION == 6 and m.trunk is None
    assert (m.training.checkpoint, m.training.exported_epoch) == ("best", m.training.best_epoch)
    assert len(m.modules) == m.training.num_modules == 40
    assert m.training.lam == 0.99 and m.training.arch == "mlp" and m.training.command == "pytest"
    assert m.input.shape == [784] and m.input.scale == pytest.approx(1 / 255)
    assert m.task.class_names[9] == "Ankle boot"
    for entry in m.modules:
        data = (exported_bundle / entry.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert entry.params == 784 * 4 + 4 + 4 * 10 + 10 and entry.flops == 2 * (784 * 4 + 4 * 10)
        assert 0 <= entry.parity <= 1e-4
    assert sorted(m.anytime_order) == list(range(40))
    assert "Brier score" in m.anytime_criterion and "backward elimination" in m.anytime_criterion
    assert "fewest errors" in m.anytime_criterion
    first = min(m.modules, key=lambda e: (e.val_error, e.id))  # the order starts with the lowest validation error
    assert m.anytime_order[0] == first.id
    # one specialist per class: k = 20 distinct modules chosen for F1 on the validation split, so
    # there they beat random 20-subsets of the same modules
    assert [s.class_index for s in m.specialists] == list(range(10))
    assert [s.class_name for s in m.specialists] == m.task.class_names
    for s in m.specialists:
        assert len(s.modules) == len(set(s.modules)) == 20
        assert s.val_f1 > s.random_val_f1 and 0 < s.ensemble_val_f1 <= 1
    assert 0 < m.metrics.test_error < 0.5 and 0 < m.metrics.val_error < 0.5


def test_every_graph_stands_alone(exported_bundle: Path):
    m = Manifest.load(exported_bundle)
    for entry in m.modules[:5]:
        proto = onnx.load(exported_bundle / entry.file)
        onnx.checker.check_model(proto, full_check=True)
        (inp,) = proto.graph.input
        (out,) = proto.graph.output
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert inp.name == "input" and dims[1] == 784 and isinstance(dims[0], str)  # dynamic batch
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert out.name == "logits" and out.type.tensor_type.shape.dim[1].dim_value == 10


def test_onnx_matches_torch_on_real_test_images(exported_bundle: Path, run_dir: Path, test_images):
    run = load_best(run_dir)
    m = Manifest.load(exported_bundle)
    x_raw, _ = test_images
    x = run.norm.apply(torch.from_numpy(x_raw[:257]))
    with torch.no_grad():
        expected = run.model(x).numpy()  # (N, M, K)
    for j in (0, 17, 39):
        session = ort.InferenceSession(str(exported_bundle / m.modules[j].file), providers=["CPUExecutionProvider"])
        for n in (1, 257):  # the batch axis is dynamic
            got = session.run(None, {"input": x[:n].numpy()})[0]
            assert np.abs(got - expected[:n, j]).max() <= 1e-4


def test_parity_check_rejects_a_wrong_graph_and_allows_float32_rounding():
    from quorum.exporter.export import _check_parity

    ref = np.array([[1.0, -2.0, 29.0], [3.0, 512.0, 0.5]], np.float32)
    assert _check_parity(0, ref + np.float32(9e-5), ref) <= 1e-4
    # at a scale of 512, float32 rounding of a few ulp anywhere in the module is allowed ...
    assert 1e-4 < _check_parity(0, ref + np.float32(3e-4), ref) < 1e-3
    # ... an error the size of a wrong weight is not
    with pytest.raises(ExportError, match="module 3"):
        _check_parity(3, ref + np.float32(1e-2), ref)
    with pytest.raises(ExportError):
        _check_parity(3, ref * np.float32(np.nan), ref)


def test_existing_bundle_needs_overwrite(exported_bundle: Path, run_dir: Path):
    with pytest.raises(ExportError, match="--overwrite"):
        export_run(run_dir, exported_bundle, progress=False)


def test_exporting_a_folder_without_a_run_says_what_to_do(tmp_path: Path):
    with pytest.raises(RunDirError, match="quorum train"):
        export_run(tmp_path, tmp_path / "b", progress=False)


@pytest.mark.slow
def test_last_checkpoint_exports_the_last_epoch(tmp_path: Path, data_dir: Path, test_images):
    run_dir = tmp_path / "run"
    cfg = TrainConfig(arch="mlp", modules=6, hidden=4, lam=0.99, epochs=3, subset=3000, seed=0, command="pytest")
    train(cfg, run_dir, progress=False)
    m = export_run(run_dir, tmp_path / "bundle", checkpoint="last", progress=False)
    last, best = load_run(run_dir, "last"), load_best(run_dir)
    val_errors = [r["val_error"] for r in last.metrics]
    assert (m.training.checkpoint, m.training.exported_epoch, m.training.epochs, last.epoch) == ("last", 3, 3, 3)
    assert m.training.best_epoch == best.epoch == last.best_epoch == 1 + int(np.argmin(val_errors))
    x = last.norm.apply(torch.from_numpy(test_images[0][:64]))
    with torch.no_grad():
        expected = last.model(x).numpy()  # (N, M, K): the last epoch's weights, not best.pt's
    session = ort.InferenceSession(str(tmp_path / "bundle" / m.modules[5].file), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected[:, 5]).max() <= 1e-4
    with pytest.raises(RunDirError, match="best, last"):
        load_run(run_dir, "first")  # type: ignore[arg-type]
