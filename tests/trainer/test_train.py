from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quorum.trainer.checkpoint import read_jsonl
from quorum.trainer.config import TrainConfig, default_lr
from quorum.trainer.errors import RunDirError
from quorum.trainer.run import load_best
from quorum.trainer.train import train

TINY = dict(modules=8, hidden=4, lam=0.95, subset=600, val_size=1000, batch_size=100)


def test_run_directory_and_metrics(tmp_path: Path, data_dir: Path):
    res = train(TrainConfig(**TINY, epochs=3), tmp_path / "r", progress=False)
    run = tmp_path / "r"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt", "best.pt"}
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["val_module_error_min"] <= r["val_module_error_mean"] <= r["val_module_error_max"]
        assert math.isfinite(r["train_loss"]) and 0 <= r["val_error"] <= 1
    # early stopping keeps the epoch with the lowest validation error
    best = min(rows, key=lambda r: r["val_error"])
    assert res.best_epoch == best["epoch"] and res.best_val_error == best["val_error"]
    loaded = load_best(run)
    assert loaded.best_epoch == best["epoch"]
    assert json.loads((run / "config.json").read_text())["lam"] == 0.95


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, data_dir: Path):
    train(TrainConfig(**TINY, epochs=3), tmp_path / "straight", progress=False)
    train(TrainConfig(**TINY, epochs=1), tmp_path / "resumed", progress=False)
    # an epoch that was logged but whose checkpoint never landed must be forgotten
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2, "val_error": 0.0}) + "\n")
    cfg = TrainConfig.load(tmp_path / "resumed" / "config.json").resumed_with({"epochs": 3})
    train(cfg, tmp_path / "resumed", resume=True, progress=False)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    ra, rb = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    assert [r["val_error"] for r in ra] == [r["val_error"] for r in rb]


def test_existing_run_is_not_overwritten(tmp_path: Path, data_dir: Path):
    train(TrainConfig(**TINY, epochs=1), tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "best.pt").read_bytes()
    with pytest.raises(RunDirError, match="--resume"):
        train(TrainConfig(**TINY, epochs=1), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "best.pt").read_bytes() == before


def test_resume_refuses_changed_training_options(tmp_path: Path):
    stored = TrainConfig(**TINY, epochs=1)
    with pytest.raises(RunDirError, match="--lam"):
        stored.resumed_with({"lam": 0.5, "epochs": 4})
    assert stored.resumed_with({"epochs": 4, "lam": 0.95}).epochs == 4


def test_resume_without_a_run_says_so(tmp_path: Path):
    with pytest.raises(RunDirError, match="no run"):
        train(TrainConfig(**TINY), tmp_path / "nothing", resume=True, progress=False)


def test_patience_stops_early(tmp_path: Path, data_dir: Path):
    # a learning rate this small cannot keep improving the validation error every epoch
    res = train(TrainConfig(**{**TINY, "lr": 1e-9}, epochs=6, patience=1), tmp_path / "r", progress=False)
    assert res.stopped_early and res.epochs_done < 6


def test_default_learning_rate_scales_with_modules():
    assert default_lr(256, 0.95) == pytest.approx(0.02 * 256) == default_lr(256, 0.99)
    assert default_lr(1, 0.5) == pytest.approx(0.02)
    assert TrainConfig(modules=16).learning_rate == pytest.approx(0.32)
    assert TrainConfig(modules=16, lr=0.1).learning_rate == 0.1
