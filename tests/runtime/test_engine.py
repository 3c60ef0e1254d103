from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from quorum.core.tasks import softmax
from quorum.runtime.engine import Engine
from quorum.runtime.errors import BundleError, InvalidRequest
from quorum.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def engine(bundle_dir: Path) -> Engine:
    return Engine.load(bundle_dir, device="cpu")


def _reference(bundle: Path, x_raw: np.ndarray, ids: list[int]) -> np.ndarray:
    """The combiner computed by hand from the manifest and plain ONNX Runtime sessions."""
    m = Manifest.load(bundle)
    x = ((x_raw.astype(np.float32) * m.input.scale - m.input.mean[0]) / m.input.std[0]).astype(np.float32)
    logits = [ort.InferenceSession(str(bundle / m.modules[j].file)).run(None, {"input": x})[0] for j in ids]
    return softmax(np.mean(logits, axis=0))


def test_budget_uses_the_prefix_of_the_anytime_order(engine: Engine, bundle_dir: Path, test_images):
    x, _ = test_images
    r = engine.predict(x[:64], budget=8)
    assert r.used == engine.manifest.anytime_order[:8] and r.requested == 8 and not r.degraded
    assert r.probabilities.shape == (64, 10)
    np.testing.assert_allclose(r.probabilities.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(r.probabilities, _reference(bundle_dir, x[:64], r.used), atol=1e-6)
    assert r.class_names[0] == engine.manifest.task.class_names[r.labels[0]]


def test_full_ensemble_is_accurate_on_real_test_images(engine: Engine, test_images):
    x, y = test_images
    r = engine.predict(x[:2000])
    assert len(r.used) == engine.num_modules == r.requested and not r.degraded
    assert (r.labels == y[:2000]).mean() == pytest.approx(1 - engine.manifest.metrics.test_error, abs=0.03)


def test_drop_removes_modules_at_random_and_marks_degraded(engine: Engine, test_images):
    x, _ = test_images
    r = engine.predict(x[:4], drop=0.5, seed=3)
    assert len(r.dropped) == 20 and len(r.used) == 20 and r.degraded
    assert not set(r.dropped) & set(r.used)
    again = engine.predict(x[:4], drop=0.5, seed=3)
    assert again.dropped == r.dropped
    np.testing.assert_array_equal(again.probabilities, r.probabilities)
    r = engine.predict(x[:4], budget=10, drop=5, seed=0)
    assert len(r.used) == 10 and len(r.dropped) == 5 and not r.degraded


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (np.zeros((2, 783)), r"shape \(N, 784\)"),
        (np.zeros(784), r"shape \(N, 784\)"),
        (np.zeros((0, 784)), "N >= 1"),
        (np.full((1, 784), np.nan), "finite"),
        (np.full((1, 784), np.inf), "finite"),
        ([["a"] * 784], "real numbers"),
        ([[1, 2], [3]], "rectangular|shape"),
        ([[{"x": 1}] * 784], "real numbers"),
        (np.full((1, 784), -0.5), "raw values"),
        (np.full((1, 784), 300.0), "raw values"),
    ],
)
def test_bad_inputs_raise_domain_errors(engine: Engine, inputs, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.predict(inputs)


def test_bad_budget_and_drop(engine: Engine, test_images):
    x, _ = test_images
    for kwargs in ({"budget": 0}, {"budget": 41}, {"drop": 1.0}, {"drop": 40}, {"drop": -2}):
        with pytest.raises(InvalidRequest):
            engine.predict(x[:1], **kwargs)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(100, len(data), 997):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_and_missing_modules_are_quarantined(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    first, second = m.anytime_order[0], m.anytime_order[1]
    _flip_bytes(bundle_copy / m.modules[first].file)
    (bundle_copy / m.modules[second].file).unlink()
    engine = Engine.load(bundle_copy, device="cpu")
    states = {s.id: s for s in engine.modules}
    assert states[first].status == "quarantined" and "checksum" in (states[first].reason or "")
    assert states[second].status == "quarantined" and "missing" in (states[second].reason or "")
    assert len(engine.healthy_ids) == 38

    x, _ = test_images
    r = engine.predict(x[:8], budget=4)
    assert r.used == m.anytime_order[2:6] and not r.degraded
    r = engine.predict(x[:8])
    assert len(r.used) == 38 and r.requested == 40 and r.degraded


def test_a_graph_that_fails_to_load_is_quarantined(bundle_copy: Path):
    m = Manifest.load(bundle_copy)
    bad = b"not an onnx graph"
    (bundle_copy / m.modules[5].file).write_bytes(bad)
    _rewrite_sha(bundle_copy, 5, bad)  # the checksum matches, so loading is what fails
    engine = Engine.load(bundle_copy, device="cpu")
    assert engine.modules[5].status == "quarantined" and "cannot load" in (engine.modules[5].reason or "")


def _rewrite_sha(bundle: Path, j: int, data: bytes) -> None:
    import hashlib

    raw = json.loads((bundle / "manifest.json").read_text())
    raw["modules"][j]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(raw))


def test_engine_refuses_to_start_with_no_healthy_module(bundle_copy: Path):
    for f in (bundle_copy / "modules").iterdir():
        _flip_bytes(f)
    with pytest.raises(BundleError, match="no healthy module"):
        Engine.load(bundle_copy, device="cpu")


def test_not_a_bundle(tmp_path: Path):
    with pytest.raises(BundleError, match="quorum export"):
        Engine.load(tmp_path)


def test_manifest_of_another_version_is_refused(bundle_copy: Path):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="version 99"):
        Engine.load(bundle_copy)


@pytest.mark.parametrize("version", [1, 2])
def test_a_bundle_of_an_older_schema_version_still_loads(bundle_copy: Path, test_images, version: int):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    del raw["training"]["checkpoint"], raw["training"]["exported_epoch"]  # added in version 3
    if version == 1:
        del raw["trunk"]  # version 1 had no trunk; classification was its only task
        raw["task"] = {"kind": "classification", "class_names": raw["task"]["class_names"]}
        raw["output"] = {"name": raw["output"]["name"], "combiner": "mean_logits_softmax"}
    raw["version"] = version
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    engine = Engine.load(bundle_copy, device="cpu")
    try:
        m = engine.manifest
        assert m.version == version and (m.training.checkpoint, m.training.exported_epoch) == ("best", None)
        assert engine.predict(test_images[0][:2], budget=3).labels.shape == (2,)
    finally:
        engine.close()


OLD_BUNDLE = Path(__file__).parents[1] / "data" / "bundle-e77a083"  # exported before the redesign


def test_an_fp32_manifest_of_schema_3_still_loads_without_a_precision(bundle_copy: Path):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    assert raw.pop("precision") is None
    raw["version"] = 3
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(bundle_copy).precision is None


def test_a_bundle_exported_before_the_redesign_still_serves(test_images):
    packed = Engine.load(OLD_BUNDLE, device="cpu", executor="packed")
    isolated = Engine.load(OLD_BUNDLE, device="cpu", executor="isolated")
    try:
        m = packed.manifest
        assert m.version == 3 and packed.bundle.packed is not None and len(m.packed.weights) == 5  # type: ignore[union-attr]
        x, y = test_images[0][:500], test_images[1][:500]
        for budget in (1, 2, 4):
            p, q = packed.predict(x, budget=budget), isolated.predict(x, budget=budget)
            assert p.used == q.used == m.anytime_order[:budget]
            np.testing.assert_allclose(p.probabilities, q.probabilities, rtol=0, atol=1e-5)
        assert (p.labels == y).mean() == pytest.approx(1 - m.metrics.test_error, abs=0.06)
        # A subset asked for again is cached, then compiled from the old core graph
        for _ in range(3):
            packed.predict(x[:3], budget=4)
        deadline = time.monotonic() + 10
        while packed.bundle.packed.compiled == 0 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert packed.bundle.packed.compiled == 1  # type: ignore[union-attr]
        np.testing.assert_allclose(packed.predict(x, budget=4).probabilities, q.probabilities, rtol=0, atol=1e-5)
    finally:
        packed.close()
        isolated.close()


def test_a_manifest_that_breaks_the_schema_is_summarized(bundle_copy: Path):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    for entry in raw["modules"]:
        del entry["sha256"]
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"modules\.0\.sha256: Field required.*and 37 more") as e:
        Engine.load(bundle_copy)
    assert len(str(e.value)) < 600


def test_module_path_outside_the_bundle_is_quarantined(bundle_copy: Path):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["modules"][0]["file"] = "../../etc/passwd"
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    engine = Engine.load(bundle_copy, device="cpu")
    assert engine.modules[0].status == "quarantined" and "outside" in (engine.modules[0].reason or "")


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([0], "positive"),
        ([-784], "positive"),
        ([100000, 100000], "holds over"),
        ([1] * 9, "at most 8"),
        ([], "at least 1"),
    ],
)
def test_a_manifest_with_an_impossible_input_shape_is_a_bundle_error(bundle_copy: Path, shape, match):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["input"]["shape"] = shape
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=rf"input\.shape.*{match}"):
        Engine.load(bundle_copy, device="cpu")


def test_module_sessions_are_made_from_the_bytes_that_were_checked(bundle_copy: Path, monkeypatch, test_images):
    """Check then use: the file is read once; swapping it after the checksum cannot reach a session."""
    import quorum.runtime.bundle as bundle_module

    made_from: list[type] = []
    real = bundle_module.ort.InferenceSession

    def spy(source, *args, **kwargs):
        made_from.append(type(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(bundle_module.ort, "InferenceSession", spy)
    engine = Engine.load(bundle_copy, device="cpu")
    try:
        assert made_from and set(made_from) == {bytes}
        assert engine.predict(test_images[0][:2]).labels.shape == (2,)
    finally:
        engine.close()
