"""The packed and isolated executors: parity with each other and with torch, verification of the
packed graph against the module files, and faults that only show at request time."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quorum.core.tasks import softmax
from quorum.exporter.packed import mlp_weights, pack_bundle
from quorum.runtime.engine import Engine
from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable
from quorum.runtime.executors import IsolatedExecutor
from quorum.runtime.faults import FaultPlan
from quorum.runtime.manifest import Manifest
from tests.bundles import flip_bytes, hang_on_zero_pixels, nan_on_zero_pixels, rewrite_module

PARITY = 1e-5  # packed against isolated, on logits and probabilities


@pytest.fixture(scope="module")
def packed(bundle_dir: Path) -> Engine:
    return Engine.load(bundle_dir, device="cpu", executor="packed")


@pytest.fixture(scope="module")
def isolated(bundle_dir: Path) -> Engine:
    return Engine.load(bundle_dir, device="cpu", executor="isolated")


def test_export_writes_a_packed_graph(packed: Engine):
    assert packed.manifest.packed is not None and packed.manifest.packed.parity < 1e-5
    assert packed.executor == "packed" and packed.packed_note is None


def _numpy_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    """Every module's logits (N, M, K) computed in numpy from the weights in its file: a reference
    that shares no code with ONNX Runtime."""
    m = Manifest.load(bundle)
    out = []
    for e in m.modules:
        w1, b1, w2, b2 = (w.astype(np.float64) for w in mlp_weights(onnx.load(bundle / e.file), "input", "logits"))
        out.append(np.maximum(x @ w1.T + b1, 0) @ w2.T + b2)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_packed_isolated_and_numpy_agree_on_random_subsets(packed, isolated, bundle_dir, test_images, batch):
    x_raw = test_images[0][:batch]
    reference_logits = _numpy_logits(bundle_dir, isolated.preprocess(x_raw).astype(np.float64))  # (N, M, K)
    rng = np.random.default_rng(batch)
    for size in (1, 2, 13, 40):
        ids = sorted(rng.choice(40, size=size, replace=False).tolist())
        a, b = packed.mean_logits(x_raw, ids), isolated.mean_logits(x_raw, ids)
        reference = reference_logits[:, ids].mean(axis=1)
        np.testing.assert_allclose(a, b, rtol=0, atol=PARITY)
        np.testing.assert_allclose(softmax(a), softmax(b), rtol=0, atol=PARITY)
        np.testing.assert_allclose(a, reference, rtol=0, atol=1e-4)
        if size == 1:
            np.testing.assert_array_equal(a, b)  # one module: the same arithmetic on both paths


def test_predict_is_the_same_on_both_executors(packed, isolated, test_images):
    x = test_images[0][:32]
    for budget in (1, 5, 40):
        p, q = packed.predict(x, budget=budget), isolated.predict(x, budget=budget, drop=None)
        assert p.used == q.used and p.requested == q.requested
        np.testing.assert_allclose(p.probabilities, q.probabilities, rtol=0, atol=PARITY)
    p, q = packed.predict(x, budget=30, drop=0.5, seed=3), isolated.predict(x, budget=30, drop=0.5, seed=3)
    assert p.dropped == q.dropped and p.used == q.used and len(p.used) == 20 and p.degraded


def test_a_quarantined_module_never_runs_in_the_packed_path(bundle_copy: Path, isolated: Engine, test_images):
    m = Manifest.load(bundle_copy)
    bad = m.anytime_order[0]
    flip_bytes(bundle_copy / m.modules[bad].file)
    engine = Engine.load(bundle_copy, device="cpu", executor="packed")
    assert engine.executor == "packed" and bad not in engine.healthy_ids

    x = test_images[0][:16]
    r = engine.predict(x)
    assert bad not in r.used and len(r.used) == 39 and r.degraded
    np.testing.assert_allclose(r.probabilities, softmax(isolated.mean_logits(x, r.used)), rtol=0, atol=PARITY)
    calls = {s.id: s.calls for s in engine.modules}
    assert calls[bad] == 0 and all(calls[j] == 1 for j in r.used)


def test_a_packed_graph_that_disagrees_with_a_module_file_is_not_used(bundle_copy: Path, test_images):
    # Module 0's file now holds module 1's weights, with a matching checksum: the files are the
    # unit of verification, so the packed graph (which still holds module 0) must not be trusted.
    rewrite_module(bundle_copy, 0, (bundle_copy / "modules/m001.onnx").read_bytes())
    engine = Engine.load(bundle_copy, device="cpu")
    assert engine.executor == "isolated" and "disagrees with modules/m000.onnx" in (engine.packed_note or "")
    assert engine.predict(test_images[0][:4]).used  # still serving, from the module files
    with pytest.raises(BundleError, match=r"executor=packed asked for, but packed\.onnx disagrees"):
        Engine.load(bundle_copy, device="cpu", executor="packed")


def test_a_corrupt_or_absent_packed_graph_falls_back_to_isolated(bundle_copy: Path):
    flip_bytes(bundle_copy / "packed.onnx")
    engine = Engine.load(bundle_copy, device="cpu")
    assert engine.executor == "isolated" and "checksum mismatch for packed.onnx" in (engine.packed_note or "")

    raw = json.loads((bundle_copy / "manifest.json").read_text())
    del raw["packed"]  # a bundle exported before packed graphs existed
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    (bundle_copy / "packed.onnx").unlink()
    engine = Engine.load(bundle_copy, device="cpu")
    assert engine.executor == "isolated" and "quorum pack" in (engine.packed_note or "")


def test_pack_adds_a_packed_graph_to_an_older_bundle(bundle_copy: Path, packed: Engine, test_images):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    del raw["packed"]
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    (bundle_copy / "packed.onnx").unlink()
    manifest = pack_bundle(bundle_copy)
    assert manifest.packed is not None and manifest.packed.parity < 1e-5
    engine = Engine.load(bundle_copy, device="cpu", executor="packed")
    x = test_images[0][:8]
    np.testing.assert_array_equal(engine.predict(x).probabilities, packed.predict(x).probabilities)


def test_pack_refuses_a_module_file_that_fails_its_checksum(bundle_copy: Path):
    flip_bytes(bundle_copy / "modules/m003.onnx")
    with pytest.raises(Exception, match="does not match its checksum"):
        pack_bundle(bundle_copy)


# ---------------------------------------------------------------- faults at request time


def test_a_module_returning_nan_in_service_is_dropped_from_the_answer(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    j = m.anytime_order[0]
    rewrite_module(bundle_copy, j, nan_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(bundle_copy, device="cpu", executor="isolated")
    assert j in engine.healthy_ids  # finite on the probe

    r = engine.predict(test_images[0][:3], budget=5)
    assert [f.id for f in r.failed] == [j] and "non-finite" in r.failed[0].reason
    assert r.used == m.anytime_order[1:5] and r.degraded and np.isfinite(r.probabilities).all()
    state = engine.modules[j]
    assert state.failures == 1 and state.last_error == "non-finite output" and state.failure_kinds == {"nonfinite": 1}
    assert r.failed[0].kind == "nonfinite"


def test_nan_weights_are_caught_at_load(bundle_copy: Path):
    m = Manifest.load(bundle_copy)
    proto = onnx.load(bundle_copy / m.modules[7].file)
    for i, init in enumerate(proto.graph.initializer):
        proto.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name)
        )
    rewrite_module(bundle_copy, 7, proto.SerializeToString())
    engine = Engine.load(bundle_copy, device="cpu")
    state = engine.modules[7]
    assert state.status == "quarantined" and "non-finite" in (state.reason or "")
    assert engine.executor == "packed"  # the packed graph agrees with every module still healthy


def test_a_hung_module_times_out_and_the_rest_answer(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    j = m.anytime_order[1]
    rewrite_module(bundle_copy, j, hang_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(bundle_copy, device="cpu", executor="isolated", workers=2, module_timeout_ms=300)
    assert j in engine.healthy_ids  # answers the probe at once
    x = test_images[0][:2]
    try:
        for _ in range(3):  # the hung runs are terminated, so they do not starve later requests
            t0 = time.perf_counter()
            r = engine.predict(x, budget=8)
            elapsed = time.perf_counter() - t0
            assert [f.id for f in r.failed] == [j] and r.failed[0].reason.startswith("timeout")
            assert r.used == [k for k in m.anytime_order[:8] if k != j] and r.degraded
            assert elapsed < 2.0
        assert engine.modules[j].failures == 3 and engine.modules[j].failure_kinds == {"timeout": 3}
        assert r.failed[0].kind == "timeout" and not r.failed[0].injected
        # An injected delay on every module does not make its own hang an injected timeout.
        r = engine.predict(x, budget=8, faults=FaultPlan(delay_ms=1))
        assert [(f.id, f.kind, f.injected) for f in r.failed] == [(j, "timeout", False)]
        r = engine.predict(x, budget=8, faults=FaultPlan(hang_probability=0.5, seed=0))
        hung = [f for f in r.failed if f.id != j]
        assert hung and {(f.kind, f.injected) for f in hung} == {("timeout", True)}
    finally:
        engine.close()


def test_cached_weights_give_bit_identical_answers(bundle_dir: Path, test_images):
    engine = Engine.load(bundle_dir, device="cpu", executor="packed")
    uncached = Engine.load(bundle_dir, device="cpu", executor="packed", packed_cache_mb=0)
    packed = engine.bundle.packed
    assert packed is not None and packed.core is not None and uncached.bundle.packed.core is None
    x = test_images[0][:9]
    for budget in (3, 17, 3, 17, 40):
        a, b = engine.predict(x, budget=budget), uncached.predict(x, budget=budget)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert (packed.hits, packed.misses) == (2, 3)
    engine.predict(x, budget=5, drop=4, seed=1)  # a random subset: not worth keeping
    assert (packed.hits, packed.misses) == (2, 3)


def test_the_weight_cache_stays_within_its_budget(bundle_dir: Path, test_images):
    engine = Engine.load(bundle_dir, device="cpu", executor="packed", packed_cache_mb=0.1)  # ~8 modules' weights
    packed = engine.bundle.packed
    assert packed is not None
    x = test_images[0][:2]
    for budget in range(1, 41):
        engine.predict(x, budget=budget)
        assert packed._cached_bytes <= packed.cache_bytes
    assert packed._cache and packed.misses == 40


def test_a_damaged_core_only_turns_the_cache_off(bundle_copy: Path, test_images):
    flip_bytes(bundle_copy / "packed_core.onnx")
    engine = Engine.load(bundle_copy, device="cpu", executor="packed")
    assert engine.executor == "packed" and engine.bundle.packed is not None and engine.bundle.packed.core is None
    assert engine.predict(test_images[0][:2], budget=4).used


# ---------------------------------------------------------------- deadlines (anytime prediction)


def test_a_deadline_answers_with_what_finished_and_is_not_a_failure(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    j = m.anytime_order[2]
    rewrite_module(bundle_copy, j, hang_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(bundle_copy, device="cpu", executor="isolated", workers=2, module_timeout_ms=5000)
    try:
        t0 = time.perf_counter()
        r = engine.predict(test_images[0][:2], budget=10, deadline_ms=300)
        assert time.perf_counter() - t0 < 1.5  # not the 5 s module timeout
        assert j in r.unfinished and j not in r.used and r.failed == [] and r.degraded
        assert r.used == [k for k in m.anytime_order[:10] if k not in r.unfinished]
        assert engine.modules[j].failures == 0  # cut off by the request's deadline, not failed
    finally:
        engine.close()


def test_packed_anytime_prediction_under_a_deadline(bundle_dir: Path, packed: Engine, test_images):
    x = test_images[0][:16]
    roomy = packed.predict(x, budget=40, deadline_ms=60_000)
    assert roomy.used == packed.manifest.anytime_order[:40] and roomy.unfinished == [] and not roomy.degraded
    np.testing.assert_allclose(roomy.probabilities, packed.predict(x, budget=40).probabilities, atol=PARITY)

    with pytest.raises(NoModulesAvailable, match="no module finished within deadline_ms=1e-06"):
        packed.predict(x, budget=40, deadline_ms=1e-6)
    patient = Engine.load(bundle_dir, device="cpu", executor="packed", wait_for_first=True)
    first = patient.predict(x, budget=40, deadline_ms=1e-6)
    assert first.used == patient.manifest.anytime_order[:1] and len(first.unfinished) == 39 and first.degraded


def test_a_deadline_must_be_a_positive_number(packed: Engine, test_images):
    for bad in (0, -5, float("nan"), float("inf"), True):
        with pytest.raises(InvalidRequest, match="deadline_ms"):
            packed.predict(test_images[0][:1], deadline_ms=bad)


# ---------------------------------------------------------------- circuit breaker


def test_a_module_that_keeps_failing_leaves_rotation_and_is_retried(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    j = m.anytime_order[0]
    rewrite_module(bundle_copy, j, nan_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(bundle_copy, device="cpu", executor="isolated", breaker=(2, 60.0, 0.3))
    real = test_images[0][:2]  # background pixels are 0: the module answers NaN
    clean = np.full((2, 784), 7, np.uint8)  # no zero pixel: the module answers
    try:
        for _ in range(2):
            assert [f.id for f in engine.predict(real, budget=5).failed] == [j]
        state = engine.modules[j]
        assert state.breaker == "open" and state.breaker_trips == 1 and 0 < (state.open_for_s or 0) <= 0.3
        r = engine.predict(real, budget=5)  # out of rotation: the next module takes its place
        assert j not in r.used and r.failed == [] and r.used == m.anytime_order[1:6] and not r.degraded

        time.sleep(0.35)  # half-open: tried again, fails, opens again
        assert [f.id for f in engine.predict(real, budget=5).failed] == [j]
        assert engine.modules[j].breaker == "open" and engine.modules[j].breaker_trips == 2
        time.sleep(0.35)  # half-open: tried on inputs it can answer, succeeds, closes
        r = engine.predict(clean, budget=5)
        assert r.used == m.anytime_order[:5] and engine.modules[j].breaker == "closed"
    finally:
        engine.close()


def test_a_half_open_module_is_tried_by_one_request_at_a_time(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    j = m.anytime_order[0]
    rewrite_module(bundle_copy, j, nan_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(bundle_copy, device="cpu", executor="isolated", breaker=(1, 60.0, 0.2))
    clean = np.full((2, 784), 7, np.uint8)
    try:
        assert [f.id for f in engine.predict(test_images[0][:2], budget=5).failed] == [j]
        time.sleep(0.25)
        assert engine.modules[j].breaker == "half_open"
        with ThreadPoolExecutor(1) as pool:  # the trial: a slow request that includes j
            trial = pool.submit(engine.predict, clean, budget=5, faults=FaultPlan(delay_ms=400))
            time.sleep(0.15)
            other = engine.predict(clean, budget=5)  # meanwhile: goes on without j
            assert other.used == m.anytime_order[1:6] and not other.degraded
            assert j in trial.result().used
        assert engine.modules[j].breaker == "closed"
        assert engine.predict(clean, budget=5).used == m.anytime_order[:5]
    finally:
        engine.close()


def test_a_module_queued_behind_slow_ones_gets_its_full_timeout(bundle_dir: Path, test_images):
    m = Manifest.load(bundle_dir)
    engine = Engine.load(bundle_dir, device="cpu", executor="isolated", workers=1, module_timeout_ms=400)
    try:
        # One drain, every run 200 ms: another drain joins every 10 ms of no progress, so about 20 run
        # at once and the last 10 start only as the first finish, about 200 ms after the request did.
        # They end past 400 ms from the request's start, yet each run is within its own timeout.
        r = engine.predict(test_images[0][:2], budget=30, faults=FaultPlan(delay_ms=200))
        assert r.failed == [] and r.used == m.anytime_order[:30]
        assert r.latency_ms < 800  # within the request's limit of twice the module timeout
    finally:
        engine.close()


class _Busy:
    """A stand-in session on a machine whose CPU is taken: runs go one at a time (`lock`), `ms` each,
    the first `slow_first` runs `slow_ms` instead; a run told to terminate while it waits ends, as
    ONNX Runtime's do."""

    def __init__(self, lock: threading.Lock, ms: float, slow_first: int = 0, slow_ms: float = 0.0):
        self.lock, self.ms, self.slow_first, self.slow_ms = lock, ms, slow_first, slow_ms

    def run(self, outputs, feed, options=None):
        with self.lock:
            if options is not None and options.terminate:
                raise RuntimeError("terminated")
            ms = self.slow_ms if self.slow_first > 0 else self.ms
            self.slow_first -= 1
            time.sleep(ms / 1e3)
        return [np.zeros((len(feed["input"]), 10), np.float32)]


def test_loading_probes_every_module_within_its_own_timeout_on_a_busy_machine():
    lock = threading.Lock()
    sessions = {j: _Busy(lock, ms=20) for j in range(20)}
    ex = IsolatedExecutor(sessions, "input", "logits", workers=2, timeout_s=0.1)  # type: ignore[arg-type]
    x = np.zeros((1, 784), np.float32)
    try:
        # As one request the 20 runs take 400 ms, past its limit of twice the module timeout.
        assert any(r.kind == "timeout" for r in ex.run(range(20), x))
        runs = ex.probe(range(20), x)
        assert [r.id for r in runs] == list(range(20)) and all(r.error is None for r in runs)
        sessions.update({j: _Busy(lock, ms=1) for j in range(20)})  # now one request is enough
        sessions[5] = _Busy(lock, ms=1, slow_first=1, slow_ms=150)  # past its timeout once: tried again
        assert ex.probe(range(20), x)[5].error is None
        sessions[6] = _Busy(lock, ms=1, slow_first=2, slow_ms=150)  # twice: it fails the probe
        assert ex.probe(range(20), x)[6].kind == "timeout"
    finally:
        ex.close()
