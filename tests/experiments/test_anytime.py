from __future__ import annotations

import json
from pathlib import Path

import pytest

from quorum.experiments.anytime import RESULT_FILE, run_anytime
from quorum.experiments.sweep import SweepConfig, run_sweep

pytestmark = pytest.mark.slow  # trains two tiny sweeps

TINY = dict(configs=["8-M-4-H"], lams=[0.99], trials=2, epochs=1, subset=600)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("anytime")
    out = []
    for name, options in (
        ("modular", {}),
        ("prefix", {"loss": "prefix", "prefix_weights": "small", "prefix_scale": 2.0}),
    ):
        report = run_sweep(SweepConfig(**TINY, **options, data_dir=str(data_dir)), root / name, progress=False)  # type: ignore[arg-type]
        assert report.failures == [] and report.trained == 2
        out.append(root / name)
    return out


def test_the_sweep_trains_each_runs_loss(sweeps: list[Path]):
    cfg = json.loads((sweeps[1] / "runs/8-M-4-H/lam0.99/seed0/config.json").read_text())
    assert (cfg["loss"], cfg["prefix_weights"], cfg["prefix_scale"], cfg["schedule"]) == (
        "prefix",
        "small",
        2,
        "constant",
    )


def test_every_variant_gets_a_row_with_every_budget_and_removal(sweeps: list[Path], tmp_path: Path):
    variants = run_anytime(sweeps, tmp_path / "report", trials=5, progress=False)
    assert [v.variant for v in variants] == ["modular, λ = 0.99", "prefix (small, μ = 2), λ = 0.99"]
    for v in variants:
        assert v.seeds == [0, 1] and v.budgets == [1, 2, 4, 8] and len(v.random_removal_acc) == 2
        assert all(0 <= mean <= 1 and se is not None for mean, se in v.test_acc)
        # the whole ensemble is every order's last prefix
        assert v.test_acc[-1][0] == pytest.approx(1 - v.test_error[0])
    assert set(variants[0].sources) == {"greedy"}  # a modular run trained no order
    run = json.loads((sweeps[1] / "runs/8-M-4-H/lam0.99/seed0" / RESULT_FILE).read_text())
    assert run["trained_test_acc"] is not None and run["removed"] == [4, 7]
    assert run["test_acc"] == (run["trained_test_acc"] if run["source"] == "trained" else run["greedy_test_acc"])
    md = (tmp_path / "report/anytime.md").read_text()
    assert "| prefix (small, μ = 2), λ = 0.99 | 0,1 |" in md and "Table 2" in md
    assert (tmp_path / "report/anytime.png").stat().st_size > 0


def test_results_are_reused_while_the_run_is_unchanged(sweeps: list[Path], tmp_path: Path):
    run_anytime(sweeps[:1], tmp_path / "a", trials=5, progress=False)
    path = sweeps[0] / "runs/8-M-4-H/lam0.99/seed0" / RESULT_FILE
    stamp = path.stat().st_mtime_ns
    run_anytime(sweeps[:1], tmp_path / "b", trials=5, progress=False)
    assert path.stat().st_mtime_ns == stamp


def test_runs_still_training_count_only_when_asked(sweeps: list[Path], tmp_path: Path):
    import shutil

    training = tmp_path / "sweep" / "runs/8-M-4-H/lam0.99/seed0"
    shutil.copytree(sweeps[0] / "runs/8-M-4-H/lam0.99/seed0", training)
    (training / "result.json").unlink()
    (training / RESULT_FILE).unlink(missing_ok=True)
    assert run_anytime([tmp_path / "sweep"], tmp_path / "a", trials=5, progress=False) == []
    [row] = run_anytime([tmp_path / "sweep"], tmp_path / "b", trials=5, unfinished=True, progress=False)
    assert row.seeds == [0] and row.epochs == [(1, 1)]
    assert "| 1 (1) |" in (tmp_path / "b/anytime.md").read_text()


def test_the_row_names_the_schedule_and_the_regularization():
    from quorum.experiments.anytime import variant_of
    from quorum.trainer.config import TrainConfig

    assert variant_of(TrainConfig(lam=0.99)) == "modular, λ = 0.99"
    cfg = TrainConfig(lam=0.99, loss="prefix", schedule="cosine", weight_decay=5e-4, augment=True, augment_pad=2)
    assert variant_of(cfg) == "prefix (uniform), λ = 0.99, cosine, weight decay 0.0005, shifts ≤ 2 px + flips"
    assert variant_of(TrainConfig(augment=True, augment_flip=False)).endswith("shifts ≤ 4 px")
    assert variant_of(TrainConfig(augment=True, augment_pad=0)).endswith("λ = 0.99, flips")


def test_a_variant_trained_for_two_lengths_gets_a_row_for_each():
    from quorum.experiments.anytime import RunAnytime, _aggregate

    def run(seed: int, epochs: int, variant: str = "prefix (uniform), λ = 0.99, cosine") -> RunAnytime:
        return RunAnytime(
            run=f"r{seed}-{epochs}", variant=variant, seed=seed, epochs_run=epochs, best_epoch=epochs,
            test_error=0.1, budgets=[1, 2], source="greedy", test_acc=[0.5, 0.9], greedy_test_acc=[0.5, 0.9],
            trained_test_acc=None, greedy_val_error=0.1, trained_val_error=None, drops=[0.5, 0.9],
            removed=[1, 1], random_removal_acc=[0.8, 0.7], trials=2,
        )  # fmt: skip

    rows = _aggregate([run(0, 40), run(1, 40), run(0, 100), run(0, 40, "modular, λ = 1")])
    names = {v.variant: v.seeds for v in rows}
    assert names == {
        "prefix (uniform), λ = 0.99, cosine, 40 epochs": [0, 1],
        "prefix (uniform), λ = 0.99, cosine, 100 epochs": [0],
        "modular, λ = 1": [0],
    }
