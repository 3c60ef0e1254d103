"""`quorum robustness` on the session's small bundle (M = 40, one epoch) and real test images."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quorum.cli import main
from quorum.experiments.robustness import (
    MARGIN_Z,
    Requirement,
    RobustnessConfig,
    SubsetScorer,
    evaluate,
    paired_margin,
    removal_grid,
)
from quorum.runtime.engine import Engine
from quorum.runtime.errors import InvalidRequest

LIMIT = 2000  # test images per run: enough for stable accuracies, fast on two cores
TRIALS = 5


@pytest.fixture(scope="module")
def engine(bundle_dir: Path) -> Engine:
    return Engine.load(bundle_dir, device="cpu")


def _run(bundle: Path, out: Path, *extra: str) -> int:
    return main(
        [
            *("robustness", str(bundle), "--out", str(out), "--limit", str(LIMIT), "--trials", str(TRIALS)),
            *("--quiet", "--device", "cpu", *extra),
        ]
    )


@pytest.fixture(scope="module")
def report(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("robustness")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _run(bundle_dir, out) == 0
    (out / "stdout.txt").write_text(printed.getvalue())
    return out, json.loads((out / "robustness.json").read_text())


def test_writes_json_and_png_with_the_paper_grid(report: tuple[Path, dict], engine: Engine):
    out, doc = report
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (doc["split"], doc["images"], doc["trials"]) == ("test", LIMIT, TRIALS)
    (b,) = doc["bundles"]
    assert (b["modules"], b["step"], b["lam"]) == (40, 2, engine.manifest.training.lam)
    assert [p["removed"] for p in b["curve"]] == [*range(0, 40, 2), 39]  # M/20 = 2, and one module left
    assert [p["removed"] for p in b["summary"]] == [0, 20, 36, 39]
    for p in b["curve"]:
        assert p["modules"] == 40 - p["removed"]
        assert 0 <= p["min"] <= p["mean"] <= p["max"] <= 1 and p["std"] >= 0
    full, single = b["curve"][0], b["curve"][-1]
    assert full["std"] == 0 and full["min"] == full["max"] == full["ordered"] == b["full_accuracy"]
    # graceful but real degradation: the whole ensemble beats any single module on average
    assert full["mean"] > single["mean"] + 0.02
    half = next(p for p in b["curve"] if p["removed"] == 20)
    assert full["mean"] >= half["mean"] - 0.01 and half["mean"] > single["mean"]


def test_full_ensemble_matches_engine_predict(report: tuple[Path, dict], engine: Engine, test_images):
    _, doc = report
    x, y = test_images
    labels = engine.predict(x[:LIMIT]).labels  # the runtime's own combiner, every module
    assert doc["bundles"][0]["full_accuracy"] == float((labels == y[:LIMIT]).mean())


def test_anytime_order_is_compared_with_random_subsets(report: tuple[Path, dict], engine: Engine, test_images):
    _, doc = report
    x, y = test_images
    b = doc["bundles"][0]
    point = next(p for p in b["curve"] if p["modules"] == 8)
    labels = engine.predict(x[:LIMIT], budget=8).labels  # the first 8 modules of the anytime order
    assert point["ordered"] == float((labels == y[:LIMIT]).mean())
    assert all(0 <= p["beats"] <= 1 for p in b["curve"])
    verdict = all(p["ordered"] > p["mean"] for p in b["curve"] if p["removed"] > 0)
    assert b["ordered_beats_random"] is verdict
    assert b["curve"][0]["margin_se"] == 0  # the whole ensemble against itself
    assert all(p["margin_se"] > 0 for p in b["curve"][1:])  # some image tells subsets of fewer modules apart
    worse = [p["modules"] for p in b["curve"][1:] if p["ordered"] - p["mean"] + MARGIN_Z * p["margin_se"] < 0]
    assert b["ordered_worse_at"] == worse


def test_paired_margin_by_image():
    # Four images; the one subset is right on 0, 1, 2; three others are right on 0 and on one of 1, 2, 3.
    ordered = np.array([1, 1, 1, 0], bool)
    random = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], bool)
    margin, se = paired_margin(ordered, random)
    d = np.array([0, 2 / 3, 2 / 3, -1 / 3])  # per image: ordered - mean over the three
    assert margin == pytest.approx(0.75 - 0.5)
    assert se == pytest.approx(d.std(ddof=1) / 2)
    # subsets that agree on every image: no margin, and nothing to be uncertain about
    assert paired_margin(ordered, ordered[None].repeat(3, 0)) == (0.0, 0.0)


def test_table_has_a_few_rows_per_bundle(report: tuple[Path, dict]):
    folder, doc = report
    out = (folder / "stdout.txt").read_text()
    rows = [line.split() for line in out.splitlines() if line.startswith("small ")]
    assert [int(r[2]) for r in rows] == [0, 20, 36, 39]
    assert "anytime order beats the random mean at every budget < 40" in out
    (b,) = doc["bundles"]
    half = next(p for p in b["curve"] if p["removed"] == 20)
    half_row = next(r for r in rows if r[2] == "20")
    # the last two columns: margin ± its 95 % half-width
    assert half_row[-3:] == [f"{half['ordered'] - half['mean']:+.4f}", "±", f"{MARGIN_Z * half['margin_se']:.4f}"]
    if not b["ordered_beats_random"]:
        worse = ", ".join(map(str, b["ordered_worse_at"])) or "none"
        assert f"budgets where it is worse by more than the 95 % interval: {worse}" in out


def test_requirements_pass_and_fail(report: tuple[Path, dict], bundle_dir: Path, tmp_path: Path, capsys):
    _, doc = report
    half = next(p for p in doc["bundles"][0]["curve"] if p["removed"] == 20)
    holds = f"drop=0.5:acc>={half['mean'] - 0.001:.4f}"
    fails = f"drop=20:min_acc>{half['min'] + 0.001:.4f}"
    assert _run(bundle_dir, tmp_path, "--require", holds) == 0
    assert f"PASS small: {holds}" in capsys.readouterr().out
    assert _run(bundle_dir, tmp_path, "--require", holds, "--require", fails) == 1
    captured = capsys.readouterr()
    assert f"PASS small: {holds}" in captured.out
    assert f"small: {fails}: measured min_acc {half['min']:.4f}" in captured.err
    written = json.loads((tmp_path / "robustness.json").read_text())
    assert written["passed"] is False
    assert [c["passed"] for c in written["bundles"][0]["checks"]] == [True, False]


def test_off_grid_requirement_is_measured_exactly(engine: Engine, test_images):
    x, y = test_images[0][:500], test_images[1][:500]
    cfg = RobustnessConfig(trials=TRIALS, step=4)
    (check,) = evaluate(engine, x, y, cfg, [Requirement.parse("drop=7:acc>=0")]).checks
    dense = evaluate(engine, x, y, RobustnessConfig(trials=TRIALS, step=1))
    assert check.removed == 7 and 7 not in removal_grid(40, 4)
    assert check.measured == dense.curve[7].mean  # same subsets: seeded by (seed, modules removed)


@pytest.mark.parametrize(
    "spec",
    [
        "acc>=0.8",  # no drop
        "drop=half:acc>=0.8",
        "drop=0.5:accuracy>=0.8",
        "drop=0.5:acc=>0.8",
        "drop=1.5:acc>=0.8",  # a fraction must be below 1
        "drop=0.5:acc>=85",  # a percentage
    ],
)
def test_malformed_requirement_is_a_usage_error(spec: str, bundle_dir: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(bundle_dir, tmp_path, "--require", spec)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--require" in err and spec in err
    assert not (tmp_path / "robustness.json").exists()


def test_drop_beyond_the_bundle_is_an_error(bundle_dir: Path, tmp_path: Path, capsys):
    assert _run(bundle_dir, tmp_path, "--require", "drop=40:acc>=0.5") == 2
    err = capsys.readouterr().err
    assert "quorum robustness: error:" in err and "drop=40" in err and "0..39" in err


def test_requirement_syntax():
    r = Requirement.parse("drop = 0.9 : min_acc < 0.7")
    assert (r.drop, r.metric, r.op, r.threshold) == (0.9, "min_acc", "<", 0.7)
    assert r.removed(256) == 230 and r.holds(0.69) and not r.holds(0.7)
    assert isinstance(Requirement.parse("drop=3:acc>0.5").drop, int)
    with pytest.raises(InvalidRequest, match="drop=D:METRIC OP VALUE"):
        Requirement.parse("drop=0.5")


def test_removal_grid():
    assert removal_grid(256) == [*range(0, 256, 13), 255]
    assert removal_grid(10) == list(range(10))
    assert removal_grid(1) == [0]
    assert removal_grid(40, 16) == [0, 16, 32, 39]


def test_subset_scorer_combines_by_mean_logits():
    # Two images, three modules, two classes. Module 2 is confident and wrong on image 0.
    logits = np.array(
        [
            [[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]],  # image 0, class 0: modules 0+1 right, all three wrong
            [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]],  # image 1, class 1: every subset right
        ],
        np.float32,
    )
    scorer = SubsetScorer(logits, np.array([0, 1]))
    np.testing.assert_array_equal(scorer.accuracy([[0, 1], [0, 1, 2], [2], [0]]), [1.0, 0.5, 0.5, 1.0])
    assert np.array_equal(scorer.random_removal(1, 50, seed=0), scorer.random_removal(1, 50, seed=0))
    assert set(scorer.random_removal(2, 50, seed=0)) == {0.5, 1.0}  # one module left: 2 is wrong, 0 and 1 right


@pytest.mark.slow
def test_runs_and_imports_without_torch(bundle_dir: Path, tmp_path: Path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import quorum.experiments.robustness, quorum.experiments.robustness_report, quorum.core.datasets\n"
        "from quorum.cli import main\n"
        f"rc = main(['robustness', {str(bundle_dir)!r}, '--out', {str(tmp_path)!r}, '--limit', '300', "
        "'--trials', '2', '--quiet', '--device', 'cpu', '--require', 'drop=0.5:acc>=0'])\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and (tmp_path / "robustness.png").is_file()


@pytest.mark.slow
def test_trials_script_pools_bundles_by_lam(report: tuple[Path, dict], tmp_path: Path):
    # four copies of the real report's bundle as two trials (seeds) each of λ = 0.99 and λ = 1, with
    # the accuracies at 90 % (36 of 40) and 50 % (20) removed set so that the pooled numbers are
    # known; a name without a seed is seed 0, and a name met again in a second file is skipped
    _, doc = report
    (b,) = doc["bundles"]
    bundles = []
    for name, lam, at_90, at_50 in (
        ("lam0.99-seed0", 0.99, 0.80, 0.0),
        ("lam0.99-seed1", 0.99, 0.84, 0.0),
        ("lam1", 1.0, 0.0, 0.83),
        ("lam1-seed1", 1.0, 0.0, 0.85),
    ):
        copy = json.loads(json.dumps(b))
        copy.update(name=name, lam=lam)
        for p in copy["summary"]:
            p["mean"] = {36: at_90, 20: at_50}.get(p["removed"], p["mean"])
        bundles.append(copy)
    src, again = tmp_path / "robustness.json", tmp_path / "again.json"
    src.write_text(json.dumps({**doc, "bundles": bundles}))
    again.write_text(json.dumps({**doc, "bundles": bundles[:1]}))
    png = tmp_path / "trials.png"
    out = subprocess.run(
        [sys.executable, "scripts/robustness_trials.py", str(src), str(again), "--out", str(png)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "λ = 0.99, 90% removed at random: 0.8200 ± 0.0200 over 2 trials (0.8000, 0.8400)" in out.stdout
    assert "λ = 1, 50% removed at random: 0.8400 ± 0.0100 over 2 trials" in out.stdout
    assert "difference: -0.0200 ± 0.0224" in out.stdout
    assert "λ = 0.99 ahead in 0 of 2 pairs: seed 0 -0.0300, seed 1 -0.0100" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
