"""`quorum sweep` on real Fashion-MNIST, shrunk to seconds: tiny configurations, a subset, one epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quorum.cli import main
from quorum.experiments.sweep import SweepConfig, lam_dirname, parse_configs, parse_lams, run_sweep
from quorum.experiments.sweep_results import mean_se
from quorum.trainer.errors import ConfigError

TINY = dict(configs=["4-M-8-H", "1-M-16-H"], lams=[0.0, 1.0], trials=2, epochs=1, subset=1500)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    report = run_sweep(SweepConfig(**TINY, data_dir=str(data_dir)), out, progress=False)
    assert (report.trained, report.reused, report.failures) == (6, 0, [])  # 4-M: 2 λ x 2 trials; 1-M: 2 trials
    return out


def test_run_layout_and_shared_initial_weights(sweep: Path):
    runs = sweep / "runs"
    results = {p.parent.relative_to(runs).as_posix(): json.loads(p.read_text()) for p in runs.glob("*/*/*/result.json")}
    assert sorted(results) == [
        "1-M-16-H/lam1/seed0",
        "1-M-16-H/lam1/seed1",  # M = 1: once per trial, whatever the λ
        "4-M-8-H/lam0/seed0",
        "4-M-8-H/lam0/seed1",
        "4-M-8-H/lam1/seed0",
        "4-M-8-H/lam1/seed1",
    ]
    init = {key: r["init_sha256"] for key, r in results.items()}
    assert init["4-M-8-H/lam0/seed0"] == init["4-M-8-H/lam1/seed0"]  # every λ of a trial starts alike
    assert init["4-M-8-H/lam0/seed0"] != init["4-M-8-H/lam0/seed1"]  # trials differ
    for r in results.values():
        assert 0 < r["test_error"] < 0.6 and r["best_epoch"] == r["epochs_run"] == 1


def test_tables_json_and_plots(sweep: Path):
    doc = json.loads((sweep / "sweep.json").read_text())
    cells = {(c["config"], c["lam"]): c for c in doc["aggregate"]}
    assert sorted(cells) == [("1-M-16-H", 0.0), ("1-M-16-H", 1.0), ("4-M-8-H", 0.0), ("4-M-8-H", 1.0)]
    one = cells[("1-M-16-H", 0.0)]
    assert one["lam_independent"] and one["test_error_mean"] == cells[("1-M-16-H", 1.0)]["test_error_mean"]
    for (config, lam), cell in cells.items():
        errors = [
            r["test_error"] for r in doc["runs"] if r["config"] == config and (r["lam"] == lam or r["modules"] == 1)
        ]
        assert cell["n"] == 2 and (cell["test_error_mean"], cell["test_error_se"]) == pytest.approx(mean_se(errors))
    assert doc["paper"]["test_error_percent"]["256-M-4-H"] == {"0": 16.3, "0.95": 10.3, "1": 10.5}
    md = (sweep / "sweep.md").read_text()
    assert "| 4-M-8-H |" in md and "± " in md and "1 epochs, 2 trials (seeds 0, 1)" in md
    for png in ("sweep.png", "sweep_nll.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rerun_reuses_and_widening_fills_one_table(sweep: Path, data_dir: Path):
    again = run_sweep(SweepConfig(**TINY, data_dir=str(data_dir)), sweep, progress=False)
    assert (again.trained, again.reused) == (0, 6)
    # another λ into the same folder: only its runs train; the table has every λ found
    wider = run_sweep(
        SweepConfig(**{**TINY, "lams": [0.5], "trials": 1}, data_dir=str(data_dir)), sweep, progress=False
    )
    assert (wider.trained, wider.reused) == (1, 1)
    lams = sorted({c.lam for c in wider.cells if c.config == "4-M-8-H"})
    assert lams == [0.0, 0.5, 1.0]


@pytest.mark.slow
def test_an_unfinished_run_is_resumed(tmp_path: Path, data_dir: Path):
    cfg = SweepConfig(configs=["2-M-8-H"], lams=[1.0], trials=1, epochs=2, subset=1500, data_dir=str(data_dir))
    run_sweep(cfg, tmp_path, progress=False)
    run = tmp_path / "runs/2-M-8-H/lam1/seed0"
    first = (run / "metrics.jsonl").read_text().splitlines()
    report = run_sweep(SweepConfig(**{**cfg.__dict__, "epochs": 3}), tmp_path, progress=False)
    assert report.trained == 1 and report.runs[0].epochs_run == 3
    assert (run / "metrics.jsonl").read_text().splitlines()[:2] == first  # continued, not retrained


def test_parsing():
    assert parse_configs("256-m-4-h, 1-M-1024-H,256-M-4-H") == ["256-M-4-H", "1-M-1024-H"]
    assert parse_configs("16-M-convnet-16.32-s2.2,16-m-CONVNET-16.32-s2.2") == ["16-M-convnet-16.32-s2.2"]
    assert SweepConfig(configs=["4-M-convnet-8.8"]).train_config("4-M-convnet-8.8", 0.5, 0).filters == "8,8"
    regularized = SweepConfig(weight_decay=5e-4, augment=True, augment_pad=2, augment_flip=False)
    cfg = regularized.train_config("256-M-4-H", 0.99, 0)
    assert (cfg.weight_decay, cfg.use_augment, cfg.augment_pad, cfg.augment_flip) == (5e-4, True, 2, False)
    assert not SweepConfig().train_config("256-M-4-H", 0.99, 0).use_augment
    assert parse_lams("1,0, 0.95,0.95") == [0.0, 0.95, 1.0]
    assert [lam_dirname(x) for x in (0.0, 0.95, 1.0, 0.5)] == ["lam0", "lam0.95", "lam1", "lam0.5"]
    with pytest.raises(ConfigError, match="not a configuration"):
        parse_configs("256x4")
    with pytest.raises(ConfigError, match="--lams"):
        parse_lams("0,1.5")
    with pytest.raises(ConfigError, match="--trials must be >= 1"):
        SweepConfig(trials=0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--configs", "big"], "not a configuration"),
        (["--lams", "0,abc"], "not a number"),
        (["--lams", "2"], "--lams"),
        (["--trials", "0"], "--trials"),
    ],
)
def test_bad_options_exit_2_with_a_message(tmp_path: Path, args: list[str], match: str, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert "quorum sweep: error:" in err and match in err
    assert not (tmp_path / "runs").exists()


def test_convnets_of_the_same_size_stay_apart_in_the_table():
    from quorum.experiments.sweep_results import RunResult, aggregate

    def result(config: str, err: float) -> RunResult:
        return RunResult(config=config, modules=8, hidden=None, lam=0.5, lam_independent=False, seed=0, lr=0.8,
                         epochs=1, epochs_run=1, best_epoch=1, val_error=err, test_error=err, test_nll=1.0,
                         module_test_nll=1.0, module_test_error=err, seconds=1.0, init_sha256="0", device="cpu",
                         torch="x", written="now")  # fmt: skip

    cells = aggregate([result("8-M-convnet-8.16", 0.2), result("8-M-convnet-16.32", 0.1)], [0.5])
    got = sorted((c.config, c.test_error_mean) for c in cells)
    assert got == [("8-M-convnet-16.32", 0.1), ("8-M-convnet-8.16", 0.2)]
