"""Calibration, uncertainty and adaptive budgets: the numpy math, and the engine's budget=auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.core.datasets import load_raw
from quorum.runtime.confidence import (
    NEVER,
    PESSIMISTIC,
    TOP_PROBABILITY,
    MemberSums,
    adaptive_exits,
    correctness_at,
    doubling_lengths,
    exit_signal,
    expected_calibration_error,
    fit_temperatures,
    lead_error,
    prefix_means,
    prefix_signals,
    stage_lengths,
    stage_signals,
    stage_thresholds,
    tempered_softmax,
    top_label_ece,
    uncertainty,
)
from quorum.runtime.engine import Engine
from quorum.runtime.errors import InvalidRequest


def test_stages_double_up_to_32_then_also_stop_halfway():
    assert stage_lengths(1) == [1]
    assert doubling_lengths(40) == stage_lengths(40) == [1, 2, 4, 8, 16, 32, 40]
    assert stage_lengths(256) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256]
    assert stage_lengths(100) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 100]
    assert doubling_lengths(256)[-2:] == [128, 256]


def test_a_temperature_fitted_on_overconfident_logits_undoes_the_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (20_000, 5))
    y = np.array([rng.choice(5, p=p) for p in tempered_softmax(z)])  # labels drawn from softmax(z): calibrated
    (t,) = fit_temperatures((3 * z)[None], y)  # three times too confident
    assert 2.4 < t < 3.6
    assert expected_calibration_error(tempered_softmax(3 * z, t), y) < expected_calibration_error(
        tempered_softmax(3 * z), y
    )


def test_prefix_means_are_the_means_of_the_first_modules_of_the_order():
    logits = np.random.default_rng(1).normal(size=(6, 5, 3)).astype(np.float32)
    order = [3, 0, 4, 1, 2]
    z = prefix_means(logits, order, [1, 3, 5])
    np.testing.assert_allclose(z[1], logits[:, [3, 0, 4]].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(z[2], logits.mean(axis=1), rtol=1e-6)


def test_modules_that_agree_have_no_mutual_information_and_a_full_vote():
    members = np.repeat(np.random.default_rng(2).normal(size=(1, 4, 10)), 7, axis=0)  # (b, N, K), all equal
    p = tempered_softmax(members[0])
    u = uncertainty(p, p.argmax(1), MemberSums.of(members), np.full(4, 7))
    assert u.mutual_information is not None and u.vote_share is not None
    np.testing.assert_allclose(u.mutual_information, 0.0, atol=1e-6)
    np.testing.assert_allclose(u.vote_share, 1.0)


def test_modules_that_disagree_have_mutual_information_and_a_split_vote():
    members = np.array([[[9.0, 0.0]], [[0.0, 9.0]]])  # two sure modules, opposite classes
    p = tempered_softmax(members.mean(axis=0))
    u = uncertainty(p, np.array([0]), MemberSums.of(members), np.array([2]))
    assert u.mutual_information is not None and u.vote_share is not None
    assert u.mutual_information[0] > 0.6  # close to log 2
    assert u.vote_share[0] == pytest.approx(0.5)


def test_member_sums_add_up_across_stages():
    members = np.random.default_rng(3).normal(size=(6, 4, 10)).astype(np.float32)
    whole = MemberSums.of(members, squares=True)
    parts = MemberSums.zeros(4, 10, squares=True)
    parts.add(MemberSums.of(members[:2], squares=True))
    parts.add(MemberSums.of(members[2:], squares=True))
    np.testing.assert_allclose(parts.probabilities, whole.probabilities, rtol=1e-5)
    np.testing.assert_allclose(parts.entropy, whole.entropy, rtol=1e-5)
    np.testing.assert_array_equal(parts.votes, whole.votes)
    np.testing.assert_allclose(parts.squares, whole.squares, rtol=1e-12)
    assert MemberSums.of(members).squares is None  # only where asked for: they cost b N K^2 multiplications
    parts.add(MemberSums.of(members[:1]))  # a part without them: no longer known
    assert parts.squares is None and MemberSums.total([whole, MemberSums.of(members)]).squares is None  # type: ignore[union-attr]


def test_the_leads_standard_error_is_that_of_the_whole_orders_lead_from_a_sample_of_its_modules():
    rng = np.random.default_rng(6)
    members = rng.normal(0, 3, (12, 50, 10)).astype(np.float32)  # (b, N, K): 12 of a 48-module order
    mean = members.mean(axis=0, dtype=np.float64)
    a = mean.argmax(axis=1)
    b = np.argsort(mean, axis=1)[:, -2]
    rows = np.arange(50)
    d = members[:, rows, a].astype(np.float64) - members[:, rows, b]  # (b, N): each module's own lead
    want = d.std(axis=0, ddof=1) / np.sqrt(12) * np.sqrt((48 - 12) / (48 - 1))
    squares = MemberSums.of(members, squares=True).squares
    assert squares is not None
    label, got = lead_error(mean, np.full(50, 12), squares, 48)
    np.testing.assert_array_equal(label, a)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the members less their largest, in float32
    # all of the order: nothing left to estimate; one module: no spread to measure
    np.testing.assert_array_equal(lead_error(mean, np.full(50, 12), squares, 12)[1], 0.0)
    one = MemberSums.of(members[:1], squares=True).squares
    assert one is not None
    np.testing.assert_array_equal(lead_error(members[0], np.ones(50), one, 48)[1], 0.0)


def test_modules_that_disagree_about_the_top_two_classes_lower_the_signal_of_the_same_lead():
    agree = np.array([[[5.0, 3.0, 0.0]]] * 8)  # (b=8, N=1, K=3): every module's lead 2
    split = np.array([[[7.0, 1.0, 0.0]], [[3.0, 5.0, 0.0]]] * 4)  # leads 6 and -2: the same mean lead
    top = tempered_softmax(agree.mean(axis=0))[0, 0]
    signals = [
        exit_signal(PESSIMISTIC, m.mean(axis=0), np.array([8]), np.ones(1), MemberSums.of(m, squares=True).squares, 64)
        for m in (agree, split)
    ]
    assert signals[0][0] == pytest.approx(top)  # no spread: the top probability itself
    assert signals[1][0] < top - 0.1
    assert exit_signal(TOP_PROBABILITY, split.mean(axis=0), np.array([8]), np.ones(1), None, 64)[0] == pytest.approx(
        top
    )
    # the members' squares not known: the top probability
    assert exit_signal(PESSIMISTIC, split.mean(axis=0), np.array([8]), np.ones(1), None, 64)[0] == pytest.approx(top)


@pytest.mark.parametrize("signal", [PESSIMISTIC, TOP_PROBABILITY])
def test_prefix_signals_are_the_signals_of_each_prefix_alone(signal):
    logits = np.random.default_rng(7).normal(0, 2, (30, 16, 5)).astype(np.float32)
    order, lengths, temps = [5, 2, 9, 0, 15, 1, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14], [1, 2, 4, 8, 16], [1, 1.5, 2, 2, 3]
    got, labels = prefix_signals(logits, order, lengths, temps, signal)
    for i, (b, t) in enumerate(zip(lengths, temps, strict=True)):
        members = logits[:, order[:b]].transpose(1, 0, 2)  # (b, N, K)
        mean = members.mean(axis=0, dtype=np.float64)
        squares = MemberSums.of(members, squares=True).squares
        want = exit_signal(signal, mean, np.full(30, b), np.full(30, t), squares, 16)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)  # the runtime sums members in float32
        np.testing.assert_array_equal(labels[i], mean.argmax(axis=1))
    with pytest.raises(ValueError, match="standard errors"):
        stage_signals(prefix_means(logits, order, lengths), None, temps, PESSIMISTIC)


def test_an_input_leaves_at_the_first_stage_whose_threshold_it_reaches():
    top = np.array([[0.9, 0.5, 0.5], [0.95, 0.99, 0.5], [0.99, 0.99, 0.6]])  # (S=3 stages, N=3 inputs)
    assert adaptive_exits(top, [0.8, 0.98]).tolist() == [0, 1, 2]
    assert adaptive_exits(top, [NEVER, NEVER]).tolist() == [2, 2, 2]


def test_a_stricter_rate_never_lowers_a_threshold():
    rng = np.random.default_rng(4)
    top = rng.uniform(0.3, 1.0, (4, 500))
    labels = rng.integers(0, 3, (4, 500))
    labels[:, top[0] > 0.8] = labels[-1, top[0] > 0.8]  # confident inputs agree with the last stage
    loose, strict = stage_thresholds(top, labels, [0.2, 0.01])
    assert all(s >= ll for s, ll in zip(strict, loose, strict=True))


def test_the_chance_of_being_right_fixes_what_no_temperature_can():
    """A lone module of a high-λ ensemble: right half the time at confidence 0.2, two thirds of the time
    at 0.95. Flattening would fix the one, sharpening the other; no one temperature fixes both."""
    from quorum.exporter.confidence import fit_correctness

    rng = np.random.default_rng(5)
    top = rng.choice([0.2, 0.6, 0.95], size=(1, 20_000)) + rng.uniform(-0.02, 0.02, (1, 20_000))
    correct = rng.random((1, 20_000)) < np.where(top < 0.4, 0.5, np.where(top < 0.8, 0.6, 0.66))
    (fit,) = fit_correctness(top, correct)
    assert np.all(np.diff(fit.right) >= 0) and fit.right[0] >= 0 and fit.right[-1] <= 1
    test_top = rng.choice([0.2, 0.6, 0.95], size=20_000) + rng.uniform(-0.02, 0.02, 20_000)
    test_correct = rng.random(20_000) < np.where(test_top < 0.4, 0.5, np.where(test_top < 0.8, 0.6, 0.66))
    right = correctness_at([1], [(np.asarray(fit.top), np.asarray(fit.right))], 1, test_top)
    assert top_label_ece(test_top, test_correct) > 0.15
    assert top_label_ece(right.astype(np.float64), test_correct) < 0.02


def _by_luck(logits: np.ndarray, y: np.ndarray) -> list[int]:
    """An order chosen on these inputs: the modules with the most right answers on them first."""
    return np.argsort(-(logits.argmax(axis=2) == y[:, None]).mean(axis=0), kind="stable").tolist()


def test_answers_of_an_order_chosen_elsewhere_are_not_flattered_by_its_choice():
    """64 modules that guess (the true class is a little likelier, the same for all): the best of them on
    some inputs look better there than anywhere else. The cross-fitted answers are measured elsewhere."""
    from quorum.exporter.confidence import cross_fitted_means

    rng = np.random.default_rng(0)
    n, m, k = 2_000, 64, 10
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, m, k))
    logits[np.arange(n), :, y] += 0.3
    stages = [1, 2, 4, 64]
    own = prefix_means(logits, _by_luck(logits, y), stages).argmax(axis=2) == y[None]
    fitted = cross_fitted_means(logits, y, stages, _by_luck)
    z, y_held = fitted.means, fitted.y
    held = z.argmax(axis=2) == y_held[None]
    assert z.shape == (len(stages), n, k) and sorted(y_held.tolist()) == sorted(y.tolist())
    np.testing.assert_allclose(np.sort(z[-1], axis=0), np.sort(logits.mean(axis=1), axis=0))  # every input once
    assert own[0].mean() > held[0].mean() + 0.03  # the luckiest module on its own inputs
    assert held[-1].mean() == pytest.approx(own[-1].mean())  # all modules: no order to flatter
    assert fitted.optimism[0] > 0.03 and fitted.optimism[-1] == pytest.approx(0.0)  # and it is measured


def test_a_lowered_chance_keeps_its_shape_and_falls_by_the_optimism():
    from quorum.exporter.confidence import lowered
    from quorum.runtime.manifest import CorrectnessMap

    chance = CorrectnessMap(top=[0.2, 0.5, 0.8, 1.0], right=[0.1, 0.4, 0.9, 1.0])
    top = np.random.default_rng(0).uniform(0.2, 1.0, 5_000)
    before = np.interp(top, chance.top, chance.right)
    after = lowered(chance, top, 0.03)
    now = np.interp(top, after.top, after.right)
    assert now.mean() == pytest.approx(before.mean() - 0.03, abs=1e-4)
    assert after.top == chance.top and np.all(np.diff(after.right) > 0) and after.right[-1] < 1.0
    assert lowered(chance, top, -0.01) == chance and lowered(chance, top, 0.0) == chance


def test_the_chance_of_being_right_blends_the_maps_of_the_stages_around_a_budget():
    low = (np.array([0.0, 1.0]), np.array([0.2, 0.2]))  # stage 1: always 0.2
    high = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))  # stage 4: the top probability itself
    top = np.array([0.5, 0.5, 0.5, 0.9])
    got = correctness_at([1, 4], [low, high], np.array([1, 2, 4, 8]), top)
    np.testing.assert_allclose(got, [0.2, 0.35, 0.5, 0.9], atol=1e-6)  # 2 lies halfway between 1 and 4 in log b
    np.testing.assert_allclose(correctness_at([1, 4], [low, high], 4, top), top, atol=1e-6)


@pytest.mark.parametrize(
    ("top", "right", "match"),
    [
        ([0.2, 0.1], [0.3, 0.4], "increase"),
        ([0.1, 0.2], [0.4, 0.3], "not decrease"),
        ([0.1, 1.2], [0.3, 0.4], "increase"),
        ([0.1, 0.2], [0.3], "as many"),
    ],
)
def test_a_correctness_map_that_is_not_a_monotone_chance_is_refused(top, right, match):
    from pydantic import ValidationError

    from quorum.runtime.manifest import CorrectnessMap

    with pytest.raises(ValidationError, match=match):
        CorrectnessMap(top=top, right=right)


# ---------------------------------------------------------------- the engine's budget=auto


@pytest.fixture(scope="module", params=["packed", "isolated"])
def engine(request: pytest.FixtureRequest, bundle_dir: Path):
    e = Engine.load(bundle_dir, executor=request.param)
    yield e
    e.close()


@pytest.fixture(scope="module")
def test_images(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_raw(data_dir)["test"]
    return x[:500].astype(np.float32), y[:500]


def test_budget_auto_uses_fewer_modules_and_loses_little_accuracy(engine: Engine, test_images):
    x, y = test_images
    full = engine.predict(x)
    auto = engine.predict(x, adaptive=True, tolerance=0.01)
    assert auto.per_input is not None
    m = engine.num_modules
    assert auto.per_input.min() >= 1 and auto.per_input.max() <= m
    assert auto.per_input.mean() < m  # easy inputs stopped early
    assert (auto.labels == y).mean() >= (full.labels == y).mean() - 0.03
    assert not auto.degraded


def test_an_input_that_used_every_stage_has_the_answer_of_the_whole_order(engine: Engine, test_images):
    x, _ = test_images
    full = engine.predict(x)
    auto = engine.predict(x, adaptive=True, tolerance=0.0)
    assert auto.per_input is not None
    last = auto.per_input == engine.num_modules
    assert last.any()
    np.testing.assert_allclose(auto.probabilities[last], full.probabilities[last], atol=1e-5)


def test_budget_auto_as_a_keyword_is_adaptive(engine: Engine, test_images):
    x = test_images[0][:30]
    a, b = engine.predict(x, budget="auto", tolerance=0.01), engine.predict(x, adaptive=True, tolerance=0.01)
    assert a.per_input is not None and b.per_input is not None
    np.testing.assert_array_equal(a.per_input, b.per_input)


@pytest.mark.parametrize("signal", [PESSIMISTIC, TOP_PROBABILITY])
def test_the_engine_exits_where_the_offline_signal_says(bundle_copy: Path, test_images, signal):
    """Stages summed stage by stage on the packed path give each input the exit that the signal of its whole
    prefix, computed at once offline, gives it; a bundle of schema version 5 still exits on its own signal."""
    from quorum.runtime.manifest import Manifest

    x = test_images[0][:200]
    manifest = Manifest.load(bundle_copy)
    conf = manifest.confidence
    assert conf is not None and conf.signal == PESSIMISTIC  # what the exporter fits
    e = Engine.load(bundle_copy)
    try:
        logits = e.module_logits(x)
    finally:
        e.close()
    order = manifest.anytime_order
    values, _ = prefix_signals(logits, order, conf.stages, conf.temperatures, signal)
    thresholds = np.median(values[:-1], axis=1).tolist()  # about half of the inputs still there leave
    rule = conf.rules[0].model_copy(update={"thresholds": thresholds})
    refitted = conf.model_copy(update={"signal": signal, "rules": [rule]})
    version = 6 if signal == PESSIMISTIC else 5
    manifest.model_copy(update={"confidence": refitted, "version": version}).dump(bundle_copy)
    want = np.asarray(conf.stages)[adaptive_exits(values, thresholds)]
    assert len(np.unique(want)) > 1 and want.min() == 1 and want.max() == conf.stages[-1]
    for executor in ("packed", "isolated"):
        e = Engine.load(bundle_copy, executor=executor)
        try:
            auto = e.predict(x, adaptive=True)
        finally:
            e.close()
        assert auto.per_input is not None
        np.testing.assert_array_equal(auto.per_input, want, err_msg=executor)


def test_max_budget_caps_the_modules_of_every_input(engine: Engine, test_images):
    auto = engine.predict(test_images[0][:50], adaptive=True, max_budget=5)
    assert auto.per_input is not None and auto.per_input.max() <= 5
    assert len(auto.used) <= 5


def test_packed_and_isolated_paths_report_the_same_uncertainty(bundle_dir: Path, test_images):
    x = test_images[0][:20]
    answers = []
    for executor in ("packed", "isolated"):
        e = Engine.load(bundle_dir, executor=executor)
        try:
            answers.append(e.predict(x, budget=16).uncertainty)
        finally:
            e.close()
    packed, isolated = answers
    assert packed is not None and isolated is not None
    for name in ("entropy", "mutual_information", "vote_share", "p_correct"):
        np.testing.assert_allclose(getattr(packed, name), getattr(isolated, name), atol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    "options",
    [
        {"adaptive": True, "budget": 4},
        {"adaptive": True, "specialist": 0},
        {"tolerance": 0.01},
        {"adaptive": True, "tolerance": 2.0},
        {"adaptive": True, "max_budget": "8"},
    ],
)
def test_contradictory_or_malformed_adaptive_options_are_refused(engine: Engine, test_images, options):
    with pytest.raises(InvalidRequest):
        engine.predict(test_images[0][:2], **options)


@pytest.mark.parametrize("executor", ["packed", "isolated"])
def test_budget_auto_under_a_deadline_answers_with_the_stages_that_finished(bundle_dir: Path, test_images, executor):
    e = Engine.load(bundle_dir, executor=executor, wait_for_first=True)
    try:
        auto = e.predict(test_images[0][:20], adaptive=True, tolerance=0.0, deadline_ms=0.001)
    finally:
        e.close()
    assert auto.per_input is not None and auto.per_input.tolist() == [1] * 20  # the first module, waited for
    assert auto.used == e.manifest.anytime_order[:1]
    assert auto.unfinished == e.manifest.anytime_order[1:] and auto.degraded


def test_a_bundle_without_thresholds_says_how_to_fit_them(bundle_copy: Path, test_images):
    from quorum.runtime.manifest import Manifest

    manifest = Manifest.load(bundle_copy)
    manifest.model_copy(update={"confidence": None}).dump(bundle_copy)
    e = Engine.load(bundle_copy)
    try:
        with pytest.raises(InvalidRequest, match="quorum calibration"):
            e.predict(test_images[0][:1], adaptive=True)
        assert e.predict(test_images[0][:1], budget=3).uncertainty is not None  # answers stay uncalibrated
    finally:
        e.close()


def test_each_answer_says_its_chance_of_being_right_where_the_bundle_has_the_fit(bundle_copy: Path, test_images):
    from quorum.runtime.manifest import Manifest

    x = test_images[0][:50]
    e = Engine.load(bundle_copy)
    try:
        conf = e.manifest.confidence
        assert conf is not None and conf.correctness is not None
        pred = e.predict(x, budget=4)
        assert pred.uncertainty is not None and pred.uncertainty.p_correct is not None
        stage = conf.stages.index(4)
        knots = conf.correctness[stage]
        want = np.interp(pred.probabilities.max(axis=1), knots.top, knots.right)
        np.testing.assert_allclose(pred.uncertainty.p_correct, want, atol=1e-6)
        auto = e.predict(x, adaptive=True)
        assert auto.uncertainty is not None and auto.uncertainty.p_correct is not None
        assert ((auto.uncertainty.p_correct >= 0) & (auto.uncertainty.p_correct <= 1)).all()
    finally:
        e.close()
    manifest = Manifest.load(bundle_copy)
    older = manifest.confidence.model_copy(update={"correctness": None})  # type: ignore[union-attr]
    manifest.model_copy(update={"confidence": older, "version": 4}).dump(bundle_copy)
    e = Engine.load(bundle_copy)
    try:
        pred = e.predict(x, budget=4)
        assert pred.uncertainty is not None and pred.uncertainty.p_correct is None  # schema 4: not fitted
    finally:
        e.close()


def test_a_manifest_names_one_of_the_exit_signals_the_runtime_computes(bundle_dir: Path):
    from typing import get_args

    from pydantic import ValidationError

    from quorum.runtime.confidence import EXIT_SIGNALS
    from quorum.runtime.manifest import ConfidenceEntry, Manifest

    assert get_args(ConfidenceEntry.model_fields["signal"].annotation) == EXIT_SIGNALS
    conf = Manifest.load(bundle_dir).confidence
    assert conf is not None
    with pytest.raises(ValidationError, match="signal"):
        ConfidenceEntry.model_validate({**conf.model_dump(), "signal": "margin"})
