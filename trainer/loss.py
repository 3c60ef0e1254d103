"""Ensemble losses: the modular loss of Webb et al. and Multiple Choice Learning (Lee et al.).

Modular loss (joint-training paper, eq. 4 and 7), for a target y from a natural exponential
family with natural parameter η and inverse link g (the ensemble's η̄ = mean_j η_j):

    L_λ = λ · NLL(η̄, y) + (1 − λ) · mean_j NLL(η_j, y),   ∂L_λ/∂η_j = (1/M)((1 − λ) g(η_j) + λ g(η̄) − y)

    categorical  g = softmax   NLL = CE(softmax(η), y)                  `modular_loss`
    gaussian     g(η) = η      NLL = (y − η)² / 2     (unit variance)    `gaussian_modular_loss` (NCL)
    poisson      g(η) = exp η  NLL = exp(η) − y·η     (counts)           `poisson_modular_loss`

NLLs are up to constants in y. λ = 0 trains the M modules independently (each with its learning
rate scaled by 1/M); λ = 1 trains one multi-branch network on the NLL of the combined prediction.
`family_loss` picks the loss by family name; `mean_prediction` is the ensemble's conditional
mean g(η̄).

MCL oracle set-loss (Lee et al., "Why M Heads are Better than One", §6.2 and Algorithm 2): each
example is assigned to the k members with the lowest CE on it, and trains only those:

    L_set = mean_i (1/k) Σ_{j ∈ top-k lowest CE_ij} CE_ij

k = M is independent training; k = 1 is Lee et al.'s oracle loss min_j CE_ij. The metric it
optimizes, oracle accuracy, is `quorum.trainer.diagnostics.oracle_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from quorum.trainer.errors import ConfigError

__all__ = [
    "FAMILIES",
    "LOSSES",
    "check_lambda",
    "ensemble_logits",
    "family_loss",
    "gaussian_modular_loss",
    "mcl_loss",
    "mean_prediction",
    "modular_loss",
    "poisson_modular_loss",
]


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


def _glm_modular_loss(
    nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eta: torch.Tensor, target: torch.Tensor, lam: float
) -> torch.Tensor:
    """Modular loss for a scalar-parameter family with elementwise `nll`; sum over D, mean over B."""
    if eta.dim() == 2:  # (B, M): one output
        eta, target = eta.unsqueeze(-1), target.unsqueeze(-1)
    assert eta.dim() == 3 and target.shape == (eta.shape[0], eta.shape[2]), (eta.shape, target.shape)
    y = target.to(eta.dtype)  # (B, D)
    joint = nll(eta.mean(dim=1), y).sum(-1).mean()
    if lam == 1.0:
        return joint
    members = nll(eta, y.unsqueeze(1)).sum(-1).mean()  # mean over (B, M) = batch mean of mean_j
    if lam == 0.0:
        return members
    return lam * joint + (1.0 - lam) * members


def gaussian_modular_loss(eta: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Batch-mean modular loss for unit-variance Gaussian targets: NLL(η, y) = (y − η)² / 2.

    This is Negative Correlation Learning: the ensemble predicts the arithmetic mean of the η_j.

    Args:
        eta: (B, M) or (B, M, D) module outputs; each of the D outputs is its own target.
        target: (B,) or (B, D) real targets.
        lam: coupling coefficient in [0, 1] (checked by the caller with `check_lambda`).
    """
    return _glm_modular_loss(lambda e, y: 0.5 * (y - e).square(), eta, target, lam)


def poisson_modular_loss(eta: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Batch-mean modular loss for Poisson (count) targets: NLL(η, y) = exp(η) − y·η, η = log rate.

    Args:
        eta: (B, M) or (B, M, D) module log-rates; each of the D outputs is its own target.
        target: (B,) or (B, D) counts.
        lam: coupling coefficient in [0, 1] (checked by the caller with `check_lambda`).
    """
    return _glm_modular_loss(lambda e, y: e.exp() - y * e, eta, target, lam)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "categorical": modular_loss,
    "gaussian": gaussian_modular_loss,
    "poisson": poisson_modular_loss,
}
FAMILIES = tuple(LOSSES)

# Canonical inverse link g of each family, applied to η̄ (class dimension last for categorical).
_INVERSE_LINK: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "categorical": lambda eta: torch.softmax(eta, dim=-1),
    "gaussian": lambda eta: eta,
    "poisson": torch.exp,
}


def _check_family(family: str) -> str:
    if family not in LOSSES:
        raise ConfigError(f"unknown target family {family!r}; use one of {', '.join(FAMILIES)}")
    return family


def family_loss(family: str, eta: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """The modular loss of `family` ("categorical", "gaussian" or "poisson"); see `LOSSES`."""
    return LOSSES[_check_family(family)](eta, target, lam)


def mean_prediction(eta: torch.Tensor, family: str) -> torch.Tensor:
    """The ensemble's conditional mean g(mean_j η_j): (B, M, ...) -> (B, ...).

    Class probabilities for "categorical" (softmax of mean logits, a normalized geometric mean
    of the members' probabilities), the mean for "gaussian", the rate exp(η̄) for "poisson".
    """
    return _INVERSE_LINK[_check_family(family)](eta.mean(dim=1))


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
