"""Classes: categorical targets, softmax of the mean logits (the normalized geometric mean of the
members' distributions), error rate as the metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from quorum.core.tasks._base import Evaluation, Task, register

if TYPE_CHECKING:
    import torch

__all__ = ["Classification", "softmax"]


SMALL = 64  # answers of at most this many values: softmax in Python floats (a numpy call costs more)


def softmax(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax, stable for large logits; into `out` (which may be z) if given."""
    e = np.subtract(z, z.max(axis=-1, keepdims=True), out=out)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


@register
class Classification(Task):
    kind = "classification"
    family = "categorical"
    combiner = "mean_logits_softmax"
    metric = "error"
    has_classes = True

    def combine(self, mean: np.ndarray, target_scale: np.ndarray, target_shift: np.ndarray) -> np.ndarray:
        if mean.size > SMALL:
            return softmax(mean, out=mean)
        rows = []  # a few inputs: in float64, rounded to float32 once
        for row in mean.tolist():
            top = max(row)
            e = [math.exp(v - top) for v in row]
            total = sum(e)
            rows.append([v / total for v in e])
        return np.array(rows, dtype=np.float32)

    def nll(self, eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -eta.log_softmax(dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def modular_loss(self, eta: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
        import torch.nn.functional as F

        assert eta.dim() == 3 and y.shape == eta.shape[:1], (eta.shape, y.shape)
        B, M, _ = eta.shape
        joint = F.cross_entropy(eta.mean(dim=1), y)
        if lam == 1.0:
            return joint
        # cross_entropy over (M, K, B) against (M, B) targets: the mean over M*B is mean_j CE_j.
        # (M, K, B) is how the batched models store their logits, so this reads them in place.
        members = F.cross_entropy(eta.permute(1, 2, 0), y.unsqueeze(0).expand(M, B))
        if lam == 0.0:
            return members
        return lam * joint + (1.0 - lam) * members

    def combined_nll(self, means: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.nll(means, y.unsqueeze(1).expand(means.shape[:2]))

    def mean_prediction(self, eta: torch.Tensor) -> torch.Tensor:
        return eta.mean(dim=1).softmax(dim=-1)

    def evaluate(self, eta: torch.Tensor, y: torch.Tensor, target_scale: Sequence[float] = ()) -> Evaluation:
        import torch.nn.functional as F

        ens = eta.mean(dim=1)  # (N, K)
        module_wrong = (eta.argmax(-1) != y.unsqueeze(1)).float()  # (N, M)
        return (
            float((ens.argmax(-1) != y).float().mean()),
            float(F.cross_entropy(ens, y)),
            module_wrong.mean(0).cpu(),
        )
