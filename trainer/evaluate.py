"""Evaluation of a batched ensemble: logits of every module, ensemble and per-module errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quorum.trainer.loss import ensemble_logits

__all__ = ["EvalResult", "evaluate", "evaluate_logits", "module_logits"]


@dataclass
class EvalResult:
    ensemble_error: float  # error of softmax(mean_j eta_j)
    ensemble_nll: float  # mean NLL of the same
    module_errors: torch.Tensor  # (M,) error of each module alone, on the CPU


@torch.no_grad()
def module_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of every module: (N, *in_shape) -> (N, M, K), on x's device."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def evaluate_logits(logits: torch.Tensor, y: torch.Tensor) -> EvalResult:
    """Metrics from precomputed logits (N, M, K) and labels (N,)."""
    ens = ensemble_logits(logits)  # (N, K)
    module_wrong = (logits.argmax(-1) != y.unsqueeze(1)).float()  # (N, M)
    return EvalResult(
        ensemble_error=float((ens.argmax(-1) != y).float().mean()),
        ensemble_nll=float(F.cross_entropy(ens, y)),
        module_errors=module_wrong.mean(0).cpu(),
    )


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> EvalResult:
    return evaluate_logits(module_logits(model, x, batch_size), y)
