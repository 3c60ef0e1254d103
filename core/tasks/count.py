"""Counts: Poisson targets with the log link; exp of the mean log-rate is the expected count;
RMSE of the counts as the metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from quorum.core.tasks._base import Evaluation, Task, glm_modular_loss, register, rmse_evaluation

if TYPE_CHECKING:
    import torch

__all__ = ["Count"]


@register
class Count(Task):
    kind = "count"
    family = "poisson"
    combiner = "mean_exp"
    metric = "RMSE"
    has_classes = False
    # The gradient carries the predicted counts (tens to hundreds), not probabilities: a smaller step.
    lr_per_module = 0.0002

    def combine(self, mean: np.ndarray, target_scale: np.ndarray, target_shift: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out: np.ndarray = np.exp(mean)  # the mean log-rate -> the expected count
        return out

    def nll(self, eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return eta.exp() - y * eta

    def modular_loss(self, eta: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
        return glm_modular_loss(self.nll, eta, y, lam)

    def mean_prediction(self, eta: torch.Tensor) -> torch.Tensor:
        return eta.mean(dim=1).exp()

    def evaluate(self, eta: torch.Tensor, y: torch.Tensor, target_scale: Sequence[float] = ()) -> Evaluation:
        return rmse_evaluation(self, eta, y, eta.exp(), target_scale)

    def initial_eta(self, y_train: torch.Tensor) -> torch.Tensor | None:
        # exp(eta) far from the mean count diverges at once: start every module at it
        return y_train.float().mean(dim=0).clamp_min(1e-3).log()
