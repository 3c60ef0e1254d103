"""Evaluation of a batched ensemble: outputs of every module, ensemble and per-module errors.

The task says what an error is (`Task.evaluate`): the error rate and the NLL of softmax(mean
logits) for classes; for regression and count targets, root-mean-square errors of the
predicted means (in the targets' own units) and the family's NLL of the ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quorum.core.tasks import Task, get_task

__all__ = ["EvalResult", "evaluate", "evaluate_logits", "evaluate_outputs", "module_logits"]

CLASSIFICATION = get_task("classification")


@dataclass
class EvalResult:
    ensemble_error: float  # error rate of softmax(mean_j eta_j); RMSE of the mean prediction for regression/counts
    ensemble_nll: float  # mean NLL of the same
    module_errors: torch.Tensor  # (M,) the same error of each module alone, on the CPU


@torch.no_grad()
def module_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of every module: (N, *in_shape) -> (N, M, K), on x's device."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def evaluate_logits(logits: torch.Tensor, y: torch.Tensor) -> EvalResult:
    """Classification metrics from precomputed logits (N, M, K) and labels (N,)."""
    return evaluate_outputs(logits, y, CLASSIFICATION)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> EvalResult:
    return evaluate_logits(module_logits(model, x, batch_size), y)


def evaluate_outputs(
    outputs: torch.Tensor, y: torch.Tensor, task: Task, target_scale: tuple[float, ...] = ()
) -> EvalResult:
    """The task's metrics of every module's outputs (N, M, K) against targets y; standardized
    regression targets are scaled back by `target_scale`, so that RMSEs are in the targets' units."""
    error, nll, module_errors = task.evaluate(outputs, y, target_scale)
    return EvalResult(ensemble_error=error, ensemble_nll=nll, module_errors=module_errors)
