"""`quorum calibration` and `quorum ood` on the session's small bundle and real Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.cli import main
from quorum.experiments.confidence import (
    auroc,
    calibrated_ece,
    calibration_report,
    fewest_within_resampled,
    ood_report,
    ood_sets,
)
from quorum.runtime.manifest import Manifest

LIMIT = 2000


@pytest.mark.slow
def test_calibration_writes_its_fit_into_the_manifest_and_draws_the_plot(bundle_copy: Path, tmp_path: Path):
    before = Manifest.load(bundle_copy).confidence
    plot = tmp_path / "calibration.png"
    report = calibration_report(bundle_copy, write=True, plot=plot, limit=LIMIT)
    after = Manifest.load(bundle_copy).confidence
    assert after is not None and after != before  # refitted on the run's validation split
    assert plot.stat().st_size > 10_000
    assert report.budgets == [1, 2, 4, 8, 16, 32, 40]
    assert all(0 <= e <= 1 for e in report.ece_before + report.ece_after + report.ece_p_correct)
    assert after.correctness is not None and len(report.ece_p_correct) == len(report.budgets)
    assert len(report.ece_if_calibrated) == len(report.budgets)
    assert all(0 < mean <= p95 < 0.2 for mean, p95 in report.ece_if_calibrated)
    assert len(report.p_correct_gap) == len(report.budgets)
    # the whole ensemble's map is an isotonic fit on these validation answers, which keeps their mean
    # (up to the rounding of its knots)
    assert report.p_correct_gap[-1][0] == pytest.approx(0, abs=2e-3)
    assert all(abs(test) < 0.2 for _, test in report.p_correct_gap)
    assert all(b <= e for b, e in zip(report.ece_best, report.ece_before, strict=True))  # T = 1 is on its grid
    assert len(report.fixed_accuracy) == 40 and len(report.adaptive) == len(after.rules)
    points, _ = report.beats_fixed()
    assert points > 0
    fewest = report.fewest_within(1.0)  # every point is within 100 points
    assert fewest is not None and fewest == min(report.curve)
    assert len(report.fewest_resampled) == 1000 and max(report.fewest_resampled) <= 40


@pytest.mark.slow
def test_the_commands_print_their_tables(bundle_dir: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["calibration", str(bundle_dir), "--limit", str(LIMIT)]) == 0
    out = capsys.readouterr().out
    assert "ECE before" in out and "budget=auto against fixed budgets" in out and "resamples of the test" in out
    assert "p_correct - accuracy: val, test" in out
    assert main(["ood", str(bundle_dir), "--limit", "500", "--budgets", "1,40"]) == 0
    out = capsys.readouterr().out
    assert "inverted test images" in out and "mutual information" in out
    assert main(["ood", str(bundle_dir), "--budgets", "one"]) == 2


def test_one_module_has_no_disagreement_to_tell_anything_apart(bundle_dir: Path):
    rows = ood_report(bundle_dir, budgets=[1, 40], limit=500)
    mi_at_1 = [r["auroc"] for r in rows if r["budget"] == 1 and r["signal"] == "mutual information"]
    assert mi_at_1 and all(a == pytest.approx(0.5) for a in mi_at_1)
    assert max(float(str(r["auroc"])) for r in rows if r["budget"] == 40) > 0.6


def test_auroc_counts_ties_half_and_orders_scores():
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_out_of_distribution_inputs_are_raw_images_in_range():
    x = np.full((3, 784), 100.0, np.float32)
    for name, images in ood_sets(x).items():
        assert images.shape[1] == 784 and images.min() >= 0 and images.max() <= 255, name


def test_a_calibrated_bundle_measures_less_ece_on_larger_splits():
    def chance(top: np.ndarray) -> np.ndarray:  # any nondecreasing map
        return 0.2 + 0.75 * top**2

    rng = np.random.default_rng(0)
    small = calibrated_ece(rng.random(2_500), rng.random(2_500), chance, draws=40)
    large = calibrated_ece(rng.random(40_000), rng.random(40_000), chance, draws=40)
    assert (small > 0).all() and (large > 0).all()
    # sampling noise: 16 times the answers, about a quarter of the ECE
    assert 2.5 < small.mean() / large.mean() < 6
    val, test = rng.random(1_000), rng.random(1_000)
    assert np.array_equal(calibrated_ece(val, test, chance, draws=3), calibrated_ece(val, test, chance, draws=3))


def test_resampling_moves_the_fewest_modules_only_where_the_rule_and_the_whole_differ():
    rng = np.random.default_rng(0)
    whole = rng.random(4_000) < 0.9
    modules = np.array([np.full(4_000, 10.0), np.full(4_000, 40.0)])
    same = fewest_within_resampled(np.array([whole, whole]), modules, whole, draws=50)
    assert (same == 10).all()  # a rule that loses nothing is within in every resample
    worse = whole.copy()
    worse[np.flatnonzero(whole)[:4]] = False  # 4 of 4,000 more wrong: 0.1 point exactly
    draws = fewest_within_resampled(np.array([worse, whole]), modules, whole, draws=400)
    assert set(draws.tolist()) == {10.0, 40.0}  # at the edge, either way by chance
    assert 0.3 < (draws == 10).mean() < 0.9
    far = whole.copy()
    far[np.flatnonzero(whole)[:40]] = False  # 1 point lost: never within
    assert (fewest_within_resampled(np.array([far, whole]), modules, whole, draws=50) == 40).all()
