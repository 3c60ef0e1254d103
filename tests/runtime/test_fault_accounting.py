"""What counts against a module's circuit breaker: its own failures only. Injected faults, inputs
that make every module overflow, and timeouts that every module of a request shares are not a
module's doing, so no client can take modules out of rotation for the others."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from quorum.runtime.breaker import Breakers
from quorum.runtime.engine import Engine
from quorum.runtime.errors import InvalidRequest, NoModulesAvailable
from quorum.runtime.faults import FaultPlan
from quorum.runtime.manifest import Manifest
from quorum.runtime.plan import Planner
from tests.bundles import hang_on_zero_pixels, nan_on_zero_pixels, rewrite_module

BREAKER = (2, 60.0, 60.0)  # two failures open a breaker for a minute


def _breakers(engine: Engine) -> dict[int, str]:
    return {m.id: m.breaker for m in engine.modules}


def test_injected_faults_never_open_a_breaker(bundle_dir: Path, test_images):
    engine = Engine.load(bundle_dir, device="cpu", breaker=BREAKER)
    try:
        j, k = engine.manifest.anytime_order[:2]
        for _ in range(5):
            r = engine.predict(test_images[0][:2], budget=4, faults=FaultPlan(fail=frozenset({j}), nan=frozenset({k})))
            assert {f.id for f in r.failed} == {j, k} and all(f.injected for f in r.failed)
        assert set(_breakers(engine).values()) == {"closed"}
        assert engine.modules[j].failure_kinds == {"injected": 5}
        assert engine.predict(test_images[0][:2], budget=4).used == engine.manifest.anytime_order[:4]
    finally:
        engine.close()


def test_inputs_that_make_every_module_overflow_are_the_clients_and_open_nothing(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    for j in m.anytime_order[:3]:  # every module the request runs: NaN on images with a zero pixel
        rewrite_module(bundle_copy, j, nan_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(bundle_copy, device="cpu", executor="isolated", breaker=BREAKER)
    try:
        for _ in range(4):
            with pytest.raises(InvalidRequest, match="every module's output overflow"):
                engine.predict(test_images[0][:2], budget=3)
        assert set(_breakers(engine).values()) == {"closed"}
        # ... while a module that alone gives NaN where its peers answer is at fault
        for _ in range(2):
            assert [f.id for f in engine.predict(test_images[0][:2], budget=4).failed] == m.anytime_order[:3]
        assert [j for j, b in _breakers(engine).items() if b == "open"] == sorted(m.anytime_order[:3])
    finally:
        engine.close()


def test_a_timeout_counts_only_when_the_modules_peers_were_quick(bundle_copy: Path, test_images):
    m = Manifest.load(bundle_copy)
    slow = m.anytime_order[:2]
    for j in slow:
        rewrite_module(bundle_copy, j, hang_on_zero_pixels(onnx.load(bundle_copy / m.modules[j].file), m))
    engine = Engine.load(
        bundle_copy, device="cpu", executor="isolated", workers=2, module_timeout_ms=200, breaker=BREAKER
    )
    x = test_images[0][:2]
    try:
        for _ in range(3):  # every module of the request times out: the request's size or a busy machine
            with pytest.raises(NoModulesAvailable, match="timeout"):
                engine.predict(x, budget=2)
        assert set(_breakers(engine).values()) == {"closed"}
        for _ in range(2):  # its peers answer at once: the slow ones are at fault
            assert sorted(f.id for f in engine.predict(x, budget=6).failed) == sorted(slow)
        assert sorted(j for j, b in _breakers(engine).items() if b == "open") == sorted(slow)
    finally:
        engine.close()


def test_no_module_in_rotation_says_why_and_when_to_retry():
    breakers = Breakers(3, failures=1, window_s=60.0, open_s=30.0)
    planner = Planner([2, 0, 1], [[0, 1]], frozenset({0, 1, 2}), breakers)
    for j in (0, 1, 2):
        breakers.failed(j)
    with pytest.raises(NoModulesAvailable, match="circuit breakers are open; the first is tried again in") as e:
        planner.plan(None, budget=2)
    assert e.value.retry_after_s is not None and 29 < e.value.retry_after_s <= 30
    with pytest.raises(NoModulesAvailable, match="every one is quarantined"):
        Planner([2, 0, 1], [], frozenset(), Breakers(3)).plan(None)
