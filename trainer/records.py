"""An epoch's metrics line (`metrics.jsonl`): the validation metrics of the whole ensemble and of
every module, the oracle accuracy and the dominance check, from every module's outputs."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from quorum.trainer.config import TrainConfig
from quorum.trainer.diagnostics import check_dominance, oracle_accuracy
from quorum.trainer.evaluate import EvalResult, evaluate_outputs

__all__ = ["epoch_record", "log_epoch"]

log = logging.getLogger("quorum.trainer.train")  # the training log, whichever process trains


def epoch_record(
    cfg: TrainConfig,
    epoch: int,
    train_loss: float,
    val_logits: torch.Tensor,
    y_val: torch.Tensor,
    target_scale: tuple[float, ...],
    t0: float,
    *,
    lr: float | None = None,
) -> tuple[dict[str, Any], EvalResult, float]:
    """The metrics line of 0-based `epoch` from every module's validation outputs (N, M, K), its
    evaluation, and the score that best.pt keeps the lowest of. Logs the dominance check. `lr`: the
    scheduled rate at the epoch's end (default: the run's constant rate)."""
    ev = evaluate_outputs(val_logits, y_val, cfg.task, target_scale)
    classes = cfg.task.has_classes
    module_errors = ev.module_errors.tolist()  # (M,)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_error": ev.ensemble_error,
        "val_nll": ev.ensemble_nll,
        "val_module_error_mean": float(ev.module_errors.mean()),
        "val_module_error_min": float(ev.module_errors.min()),
        "val_module_error_max": float(ev.module_errors.max()),
        "val_module_error_median": round(statistics.median(module_errors), 5),
        "val_module_errors": [round(x, 5) for x in module_errors],
        # Lee et al.: some module is right
        **({"val_oracle_accuracy": oracle_accuracy(val_logits, y_val)} if classes else {}),
        "lr": cfg.learning_rate if lr is None else lr,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    # The dominance rule's thresholds are error rates: classification only.
    dominance = check_dominance(epoch + 1, module_errors, ev.ensemble_error, cfg.dominance_epoch if classes else 0)
    if dominance is not None:
        record["dominance"] = dominance.to_dict()
        (log.warning if dominance.warning else log.info)(dominance.message(cfg.lam))
    # What best.pt keeps: the lowest validation error; for MCL, which trains the oracle
    # (some module right, Lee et al.), the lowest oracle error.
    score = 1.0 - record["val_oracle_accuracy"] if cfg.loss == "mcl" else ev.ensemble_error
    return record, ev, score


def log_epoch(cfg: TrainConfig, record: dict[str, Any]) -> None:
    """One line per epoch, for runs without a progress bar."""
    log.info(
        "epoch %d/%d: loss %.4f, val error %.4f (modules %.3f-%.3f, mean %.3f), %.1f s",
        record["epoch"], cfg.epochs, record["train_loss"], record["val_error"], record["val_module_error_min"],
        record["val_module_error_max"], record["val_module_error_mean"], record["seconds"],
    )  # fmt: skip
