"""Evaluation of a batched ensemble: outputs of every module, ensemble and per-module errors.

Classification: error rates and the NLL of softmax(mean logits). Regression and count
targets: root-mean-square errors of the predicted means (in the targets' own units) and the
family's NLL of the ensemble, up to constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quorum.trainer.loss import ensemble_logits, family_loss, mean_prediction

__all__ = ["EvalResult", "evaluate", "evaluate_logits", "evaluate_outputs", "evaluate_regression", "module_logits"]


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


def evaluate_regression(
    eta: torch.Tensor, y: torch.Tensor, family: str, target_scale: tuple[float, ...] = ()
) -> EvalResult:
    """Metrics of natural parameters eta (N, M, D) against targets y (N, D) of a Gaussian or
    Poisson `family`. Gaussian targets standardized for training are scaled back by
    `target_scale`, so that the RMSEs are in the targets' units."""
    scale = torch.tensor(target_scale, device=eta.device) if target_scale else torch.ones((), device=eta.device)
    if family == "gaussian":
        ens_pred, module_pred = eta.mean(dim=1), eta
    else:
        ens_pred, module_pred = mean_prediction(eta, family), torch.exp(eta)
    ens_rmse = (((ens_pred - y) * scale) ** 2).mean().sqrt()
    module_rmse = (((module_pred - y.unsqueeze(1)) * scale) ** 2).mean(dim=(0, 2)).sqrt()
    return EvalResult(
        ensemble_error=float(ens_rmse),
        ensemble_nll=float(family_loss(family, eta, y, 1.0)),
        module_errors=module_rmse.cpu(),
    )


def evaluate_outputs(
    outputs: torch.Tensor, y: torch.Tensor, family: str = "categorical", target_scale: tuple[float, ...] = ()
) -> EvalResult:
    """`evaluate_logits` for classes, `evaluate_regression` for Gaussian and Poisson targets."""
    if family == "categorical":
        return evaluate_logits(outputs, y)
    return evaluate_regression(outputs, y, family, target_scale)
