from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quorum.trainer.checkpoint import read_jsonl
from quorum.trainer.config import TrainConfig, default_lr
from quorum.trainer.errors import ConfigError, RunDirError
from quorum.trainer.run import load_best
from quorum.trainer.train import train

TINY = dict(modules=8, hidden=4, lam=0.95, subset=600, val_size=1000, batch_size=100)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_resume_compares_options_as_the_config_holds_them():
    stored = TrainConfig(**TINY, epochs=1)
    assert stored.resumed_with({"hidden": "4", "epochs": 2}).epochs == 2  # the command line's "4" is the run's 4
    with pytest.raises(RunDirError, match="--hidden"):
        stored.resumed_with({"hidden": "8,8"})


def test_resume_without_a_run_says_so(tmp_path: Path):
    with pytest.raises(RunDirError, match="no run"):
        train(TrainConfig(**TINY), tmp_path / "nothing", resume=True, progress=False)


@pytest.mark.slow
def test_patience_stops_early(tmp_path: Path, data_dir: Path):
    # a learning rate this small cannot keep improving the validation error every epoch
    res = train(TrainConfig(**{**TINY, "lr": 1e-9}, epochs=6, patience=1), tmp_path / "r", progress=False)
    assert res.stopped_early and res.epochs_done < 6


def test_default_learning_rate_scales_with_modules():
    assert default_lr(256) == pytest.approx(0.02 * 256)
    assert default_lr(1) == pytest.approx(0.02)
    assert default_lr(8, "convnet") == pytest.approx(0.8)
    assert TrainConfig(dataset="linnerud", modules=8).learning_rate == pytest.approx(0.0016)
    assert TrainConfig(modules=256, lam=0.95).learning_rate == TrainConfig(modules=256, lam=1.0).learning_rate
    assert TrainConfig(modules=16).learning_rate == pytest.approx(0.32)
    assert TrainConfig(modules=16, lr=0.1).learning_rate == 0.1


@pytest.mark.slow
def test_mcl_trains_each_example_into_its_best_modules_and_reports_oracle_accuracy(tmp_path: Path, data_dir: Path):
    cfg = TrainConfig(**{**TINY, "lam": 0.0}, epochs=3, loss="mcl", mcl_k=1, pretrain_epochs=1)
    res = train(cfg, tmp_path / "mcl", progress=False)
    rows = read_jsonl(tmp_path / "mcl" / "metrics.jsonl")
    # best.pt keeps what MCL trains: the epoch of the best oracle
    assert res.best_val_error == pytest.approx(1 - max(r["val_oracle_accuracy"] for r in rows))
    for r in rows:  # the oracle (some module right) is never below the best module
        assert 1 - r["val_oracle_accuracy"] <= r["val_module_error_min"] + 1e-9
    # k = 1 specializes: after MCL epochs the oracle is far better than any one module
    assert rows[-1]["val_oracle_accuracy"] > 1 - rows[-1]["val_module_error_min"] + 0.1


def test_mcl_options_are_checked():
    with pytest.raises(ConfigError, match="--mcl-k"):
        TrainConfig(modules=4, loss="mcl", mcl_k=5)
    with pytest.raises(ConfigError, match="--pretrain-epochs"):
        TrainConfig(modules=4, pretrain_epochs=2)


def test_augment_options_are_checked():
    from quorum.trainer.data import load_dataset
    from quorum.trainer.train import batch_augment

    with pytest.raises(ConfigError, match="--augment-pad"):
        TrainConfig(augment=True, augment_pad=-1)
    with pytest.raises(ConfigError, match="changes no image"):
        TrainConfig(augment=True, augment_pad=0, augment_flip=False)
    TrainConfig(augment=False, augment_pad=0, augment_flip=False)  # the options of augmentation that is off
    assert batch_augment(TrainConfig(), load_dataset("diabetes")) is None  # off unless asked, outside CIFAR
    with pytest.raises(ConfigError, match="--augment transforms images"):
        batch_augment(TrainConfig(dataset="diabetes", augment=True), load_dataset("diabetes"))


@pytest.mark.slow
def test_an_mlp_trains_on_shifted_fashion_mnist(tmp_path: Path, data_dir: Path):
    cfg = TrainConfig(**TINY, epochs=2, augment=True, augment_pad=2, augment_flip=False, data_dir=str(data_dir))
    res = train(cfg, tmp_path / "aug", progress=False)
    assert res.best_val_error < 0.5  # it learns from the shifted images (chance: 0.9)
    stored = json.loads((tmp_path / "aug" / "config.json").read_text())
    assert (stored["augment"], stored["augment_pad"], stored["augment_flip"]) == (True, 2, False)


@pytest.mark.slow
def test_regression_on_diabetes_beats_predicting_the_mean(tmp_path: Path):
    from quorum.trainer.data import load_dataset

    res = train(
        TrainConfig(dataset="diabetes", modules=8, hidden=8, lam=0.9, epochs=40), tmp_path / "r", progress=False
    )
    data = load_dataset("diabetes")
    baseline = float(data.val.y.std()) * data.target_scale[0]  # RMSE of the training mean, about
    assert res.best_val_error < 0.85 * baseline, (res.best_val_error, baseline)
    run = load_best(tmp_path / "r")
    assert run.task == "regression" and run.target_names == ["progression"] and run.model.num_classes == 1
    with pytest.raises(ConfigError, match="--arch mlp"):
        TrainConfig(dataset="diabetes", arch="convnet")


@pytest.mark.slow
def test_count_targets_train_with_the_poisson_loss(tmp_path: Path):
    train(TrainConfig(dataset="linnerud", modules=4, hidden=4, lam=0.9, epochs=20, batch_size=4), tmp_path / "c",
          progress=False)  # fmt: skip
    run = load_best(tmp_path / "c")
    assert run.task == "count" and run.target_names == ["Chins", "Situps", "Jumps"]
    rows = read_jsonl(tmp_path / "c" / "metrics.jsonl")
    assert all(math.isfinite(r["train_loss"]) for r in rows) and "val_oracle_accuracy" not in rows[0]


@pytest.mark.slow
def test_bf16_autocast_trains_as_well_as_fp32(tmp_path: Path, data_dir: Path):
    fp32 = train(TrainConfig(**TINY, epochs=2, precision="fp32"), tmp_path / "fp32", progress=False)
    bf16 = train(TrainConfig(**TINY, epochs=2, precision="bf16"), tmp_path / "bf16", progress=False)
    assert abs(bf16.best_val_error - fp32.best_val_error) < 0.05, (bf16.best_val_error, fp32.best_val_error)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(TrainConfig(**TINY, epochs=1, precision="fp16", device="cpu"), tmp_path / "fp16", progress=False)
    assert not (tmp_path / "fp16").exists()
