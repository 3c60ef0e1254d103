"""The modular loss of Webb et al. for categorical targets (joint-training paper, eq. 4 and 7).

    L_lambda = lambda * CE(softmax(mean_j eta_j), y) + (1 - lambda) * mean_j CE(softmax(eta_j), y)

lambda = 0 trains the M modules independently (each with its learning rate scaled by 1/M);
lambda = 1 trains one multi-branch network on the NLL of the combined prediction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quorum.trainer.errors import ConfigError

__all__ = ["check_lambda", "ensemble_logits", "modular_loss"]


def check_lambda(lam: float) -> float:
    """Return `lam` if it is a valid modular-loss coefficient, else raise ConfigError."""
    if not math.isfinite(lam):
        raise ConfigError(f"lambda must be a finite number in [0, 1], got {lam}")
    if lam > 1:
        raise ConfigError(
            f"lambda = {lam} > 1 is refused: by Theorem 1 of Webb et al., 'Joint Training of Neural "
            "Network Ensembles', the modular loss is then unbounded below while the ensemble NLL "
            "grows without bound. Use lambda in [0, 1]; 0.95-0.99 keeps joint-training accuracy "
            "with graceful degradation."
        )
    if lam < 0:
        raise ConfigError(f"lambda must lie in [0, 1], got {lam}")
    return float(lam)


def ensemble_logits(logits: torch.Tensor) -> torch.Tensor:
    """The combiner's natural parameter: mean of module logits. (B, M, K) -> (B, K)."""
    return logits.mean(dim=1)


def modular_loss(logits: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Batch-mean modular loss.

    Args:
        logits: (B, M, K) module logits.
        target: (B,) class indices.
        lam: coupling coefficient in [0, 1] (checked by the caller with `check_lambda`).
    """
    assert logits.dim() == 3 and target.shape == logits.shape[:1], (logits.shape, target.shape)
    B, M, _ = logits.shape
    joint = F.cross_entropy(ensemble_logits(logits), target)
    if lam == 1.0:
        return joint
    # cross_entropy over (M, K, B) against (M, B) targets: the mean over M*B is mean_j CE_j.
    # (M, K, B) is how the batched models store their logits, so this reads them in place.
    members = F.cross_entropy(logits.permute(1, 2, 0), target.unsqueeze(0).expand(M, B))
    if lam == 0.0:
        return members
    return lam * joint + (1.0 - lam) * members
