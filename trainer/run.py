"""Reading a finished (or interrupted) run directory back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from quorum.trainer.checkpoint import load_checkpoint, read_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.data import Normalization
from quorum.trainer.errors import RunDirError
from quorum.trainer.models import Ensemble
from quorum.trainer.train import LAST, build_model, settle_staged_best

__all__ = ["CHECKPOINTS", "Checkpoint", "LoadedRun", "load_best", "load_run"]

Checkpoint = Literal["best", "last"]  # best.pt: the lowest validation error; last.pt: the last finished epoch
CHECKPOINTS: tuple[Checkpoint, ...] = ("best", "last")


@dataclass
class LoadedRun:
    config: TrainConfig
    model: Ensemble  # eval mode, on the CPU, with the loaded checkpoint's weights
    norm: Normalization
    class_names: list[str]  # classification; empty for regression and counts
    in_shape: tuple[int, ...]
    best_epoch: int  # 1-based epoch of best.pt, the lowest validation error
    metrics: list[dict[str, Any]]  # metrics.jsonl, one record per finished epoch
    checkpoint: Checkpoint = "best"  # which file the weights came from
    epoch: int = 0  # 1-based epoch whose weights `model` holds: best_epoch for best.pt
    task: str = "classification"  # classification | regression | count
    target_names: list[str] = field(default_factory=list)
    target_shift: list[float] = field(default_factory=list)  # regression: targets were (y - shift) / scale
    target_scale: list[float] = field(default_factory=list)

    @property
    def num_outputs(self) -> int:
        return len(self.class_names) or len(self.target_names)

    @property
    def epochs_done(self) -> int:
        return len(self.metrics)


def load_best(run_dir: str | Path) -> LoadedRun:
    """Load `run_dir/best.pt`, the weights of the epoch with the lowest validation error."""
    return load_run(run_dir, "best")


def load_run(run_dir: str | Path, checkpoint: Checkpoint = "best") -> LoadedRun:
    """Load one of a run's checkpoints: `best` (best.pt) or `last` (last.pt, the last finished epoch)."""
    if checkpoint not in CHECKPOINTS:
        raise RunDirError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    run_dir = Path(run_dir)
    if (run_dir / LAST).exists():
        settle_staged_best(run_dir, load_checkpoint(run_dir / LAST))  # a kill between an epoch's writes
    path = run_dir / f"{checkpoint}.pt"
    if not path.exists():
        what = "no run (no config.json)" if not (run_dir / "config.json").exists() else "no finished epoch yet"
        raise RunDirError(f"{run_dir} holds {what}: train it first with `quorum train --out {run_dir}`")
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    in_shape = tuple(ckpt["in_shape"])
    outputs = len(ckpt["class_names"]) or len(ckpt.get("target_names", []))
    model = build_model(cfg, in_shape, outputs)
    model.load_state_dict(ckpt["model"])
    model.eval()
    n = ckpt["norm"]
    epoch = int(ckpt["epoch"])
    return LoadedRun(
        config=cfg,
        model=model,
        norm=Normalization(scale=n["scale"], mean=tuple(n["mean"]), std=tuple(n["std"])),
        class_names=list(ckpt["class_names"]),
        in_shape=in_shape,
        best_epoch=epoch if checkpoint == "best" else int(ckpt["best_epoch"]),
        metrics=read_jsonl(run_dir / "metrics.jsonl"),
        checkpoint=checkpoint,
        epoch=epoch,
        task=ckpt.get("task", "classification"),
        target_names=list(ckpt.get("target_names", [])),
        target_shift=list(ckpt.get("target_shift", [])),
        target_scale=list(ckpt.get("target_scale", [])),
    )
