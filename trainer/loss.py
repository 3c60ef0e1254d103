"""Ensemble losses: the modular loss of Webb et al. and Multiple Choice Learning (Lee et al.).

Modular loss (joint-training paper, eq. 4 and 7), for a target y from a natural exponential
family with natural parameter η and inverse link g (the ensemble's η̄ = mean_j η_j):

    L_λ = λ · NLL(η̄, y) + (1 − λ) · mean_j NLL(η_j, y),   ∂L_λ/∂η_j = (1/M)((1 − λ) g(η_j) + λ g(η̄) − y)

Each target task owns its family's loss (`quorum.core.tasks`: categorical for classes,
Gaussian for regression (NCL), Poisson for counts); `modular_loss` here is the categorical one.
λ = 0 trains the M modules independently (each with its learning rate scaled by 1/M); λ = 1
trains one multi-branch network on the NLL of the combined prediction.

MCL oracle set-loss (Lee et al., "Why M Heads are Better than One", §6.2 and Algorithm 2): each
example is assigned to the k members with the lowest CE on it, and trains only those:

    L_set = mean_i (1/k) Σ_{j ∈ top-k lowest CE_ij} CE_ij

k = M is independent training; k = 1 is Lee et al.'s oracle loss min_j CE_ij. The metric it
optimizes, oracle accuracy, is `quorum.trainer.diagnostics.oracle_accuracy`.

The prefix-aware losses (`prefix`, `dropout`) add to L_λ the NLL of the sub-ensembles that a
budget serves: trainer/prefix.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quorum.core.tasks import get_task
from quorum.trainer.errors import ConfigError

__all__ = ["LOSSES", "check_lambda", "ensemble_logits", "mcl_loss", "modular_loss"]

CLASSIFICATION = get_task("classification")

# The registry of training losses (`--loss`): name -> what it trains. `train.loss_for_epoch` builds each.
LOSSES = {
    "modular": "L_λ for the dataset's target family (every architecture and family)",
    "mcl": "Multiple Choice Learning: each example trains its k best modules (classes)",
    "prefix": "L_λ plus the NLL of the prefixes 1, 2, 4, …, M of the module order (trainer/prefix.py)",
    "dropout": "L_λ plus the NLL of the prefixes of a random module order drawn each step (trainer/prefix.py)",
}


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
    """Batch-mean modular loss of class logits (B, M, K) against labels (B,); `lam` in [0, 1]
    (checked by the caller with `check_lambda`). The classification task's loss."""
    return CLASSIFICATION.modular_loss(logits, target, lam)


def mcl_loss(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Batch-mean MCL oracle set-loss: each example trains only its k lowest-CE members.

    The assignment is not differentiated: the gradient reaches the k chosen members of each
    example, each weighted 1/(B·k). Ties go to the lower member index (Lee et al. break them
    at random).

    Args:
        logits: (B, M, K) module logits.
        target: (B,) class indices.
        k: members per example, 1 <= k <= M; k = M is independent training.
    """
    assert logits.dim() == 3 and target.shape == logits.shape[:1], (logits.shape, target.shape)
    B, M, _ = logits.shape
    if not 1 <= k <= M:
        raise ConfigError(f"MCL assigns each example to k of the M = {M} members: need 1 <= k <= {M}, got k = {k}")
    # (M, K, B) is how the batched models store their logits, so this reads them in place.
    ce = F.cross_entropy(logits.permute(1, 2, 0), target.expand(M, B), reduction="none")  # (M, B)
    if k == M:
        return ce.mean()
    # topk's values carry the gradient of the chosen entries only; the choice itself is constant.
    return ce.topk(k, dim=0, largest=False).values.mean()
