"""Real values: unit-variance Gaussian targets, trained standardized; the mean of the modules'
outputs in the targets' units is the answer (Negative Correlation Learning); RMSE as the metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from quorum.core.tasks._base import Evaluation, Task, glm_modular_loss, register, rmse_evaluation

if TYPE_CHECKING:
    import torch

__all__ = ["Regression"]


@register
class Regression(Task):
    kind = "regression"
    family = "gaussian"
    combiner = "mean"
    metric = "RMSE"
    has_classes = False
    standardizes_targets = True

    def combine(self, mean: np.ndarray, target_scale: np.ndarray, target_shift: np.ndarray) -> np.ndarray:
        out: np.ndarray = mean * target_scale + target_shift  # back to the targets' units
        return out

    def nll(self, eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (y - eta).square()

    def modular_loss(self, eta: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
        return glm_modular_loss(self.nll, eta, y, lam)

    def mean_prediction(self, eta: torch.Tensor) -> torch.Tensor:
        return eta.mean(dim=1)

    def evaluate(self, eta: torch.Tensor, y: torch.Tensor, target_scale: Sequence[float] = ()) -> Evaluation:
        return rmse_evaluation(self, eta, y, eta, target_scale)
