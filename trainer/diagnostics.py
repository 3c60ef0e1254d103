"""Per-module diagnostics of a λ-ensemble: early module dominance and output entropy.

Module dominance (Webb et al., "To Ensemble or Not Ensemble", §"When does End-to-End
ensemble training fail?"): when over-capacity modules are trained jointly (λ near 1), one
member fits the data and carries the ensemble while the others stagnate near their initial
values, since the normalized geometric mean lets a single confident member veto the rest.
The member with the lowest error at the end of epoch 3 goes on to dominate, so the effect can
be diagnosed early. The rule used here is `check_dominance`.

Output entropy (Webb et al., "Joint Training of Neural Network Ensembles", Table 6): the
mean entropy H[q_i] of module i's predicted class distribution over a data set, summarized
by its min, max, mean and std over the modules.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quorum.trainer.loss import ensemble_logits

__all__ = [
    "DOMINANCE_GAP_RATIO",
    "DOMINANCE_SPREAD",
    "Dominance",
    "EntropyStats",
    "check_dominance",
    "entropy_stats",
    "oracle_accuracy",
    "suggest_lambda",
]

# A member dominates when its own excess error over the ensemble is at most this fraction of
# the median member's excess error ...
DOMINANCE_GAP_RATIO = 0.25
# ... and the median member is at least this much (absolute error) worse than the best one.
DOMINANCE_SPREAD = 0.2


@dataclass(frozen=True)
class Dominance:
    """The dominance rule evaluated on one epoch's validation errors."""

    epoch: int  # 1-based epoch whose errors were checked
    ensemble_error: float  # e: error of the combined prediction
    best_module: int  # index of the module with the lowest error; -1 when unknown (older runs)
    best_error: float  # b: that module's error
    median_error: float  # m: median module error
    gap_ratio: float  # (b - e) / (m - e); inf when the median module is no worse than the ensemble
    spread: float  # m - b
    warning: bool  # the rule fired: one member carries the ensemble

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ensemble_error", "best_error", "median_error", "gap_ratio", "spread"):
            d[k] = round(d[k], 5) if math.isfinite(d[k]) else None  # JSON has no inf
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dominance:
        gap = d["gap_ratio"]
        return cls(**{**d, "gap_ratio": math.inf if gap is None else gap})

    def message(self, lam: float) -> str:
        """What the check found, in one line for the log; names a λ to try when it fired."""
        numbers = (
            f"at epoch {self.epoch} {'the best module' if self.best_module < 0 else f'module {self.best_module}'} "
            f"has validation error {self.best_error:.4f}, "
            f"the ensemble {self.ensemble_error:.4f}, the median module {self.median_error:.4f}"
        )
        if not self.warning:
            return f"no module dominance: {numbers}"
        return (
            f"module dominance: {numbers}. One member carries the ensemble while the others stagnate: "
            f"the modules look over capacity for joint training at λ={lam:g}. "
            f"Consider a lower λ, e.g. --lam {suggest_lambda(lam):g}."
        )


def suggest_lambda(lam: float) -> float:
    """A lower λ to try after dominance at `lam`.

    0.5 was the best λ for the smallest over-capacity DenseNet ensemble of the joint-training
    paper (Table 5); below that, independent training (0) was best for the larger ones.
    """
    return 0.5 if lam > 0.5 else 0.0


def check_dominance(
    epoch: int,
    module_errors: Sequence[float],
    ensemble_error: float,
    dominance_epoch: int = 3,
) -> Dominance | None:
    """Evaluate the dominance rule once, at the end of `dominance_epoch` (1-based).

    With e the ensemble's validation error, b the best module's and m the median module's, the
    rule fires when

        b - e <= DOMINANCE_GAP_RATIO * (m - e)   and   m - b >= DOMINANCE_SPREAD

    that is, the best member is almost as accurate as the whole ensemble (it closes at least
    three quarters of the median member's gap to it) while the typical member is far worse.
    A healthy λ-ensemble of small modules has every member far from the ensemble (b - e large);
    independently trained modules are all close to each other (m - b small); neither fires.

    Returns:
        None when the check is off (`dominance_epoch` 0), when `epoch` is not the dominance
        epoch, or when there is a single module; else the numbers and whether the rule fired.
    """
    if dominance_epoch < 0:
        raise ValueError(f"dominance_epoch must be >= 0 (0 turns the check off), got {dominance_epoch}")
    if dominance_epoch == 0 or epoch != dominance_epoch or len(module_errors) < 2:
        return None
    errors = [float(x) for x in module_errors]
    best = min(range(len(errors)), key=errors.__getitem__)
    b, m, e = errors[best], statistics.median(errors), float(ensemble_error)
    gap_ratio = (b - e) / (m - e) if m > e else math.inf
    spread = m - b
    warning = gap_ratio <= DOMINANCE_GAP_RATIO and spread >= DOMINANCE_SPREAD
    return Dominance(epoch, e, best, b, m, gap_ratio, spread, warning)


@dataclass(frozen=True)
class EntropyStats:
    """Mean predictive entropy H[q_i] per module (nats), summarized over the modules."""

    min: float
    max: float
    mean: float
    std: float  # population std over the modules
    ensemble: float  # mean entropy of the combined prediction softmax(mean_j η_j)
    per_module: list[float]  # (M,) mean entropy of each module

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy of softmax(logits): (N, ..., K) -> (...)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)  # finite logits give finite logp: no 0·(-inf)
    return h.mean(0)


@torch.no_grad()
def oracle_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of examples that at least one module (N, M, K) classifies right (Lee et al.'s oracle).

    Against the ensemble's accuracy it shows how much the members specialize: members that
    are right on different examples give an oracle far above each of them.
    """
    if logits.dim() != 3 or tuple(y.shape) != (logits.shape[0],):
        raise ValueError(f"need logits (N, M, K) and labels (N,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    return float((logits.argmax(dim=-1) == y.unsqueeze(1)).any(dim=1).double().mean())


@torch.no_grad()
def entropy_stats(logits: torch.Tensor) -> EntropyStats:
    """Entropy statistics of module logits (N, M, K), as in Table 6 of the joint-training paper."""
    if logits.dim() != 3 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, M, K) with N >= 1, got {tuple(logits.shape)}")
    per_module = _mean_entropy(logits)  # (M,)
    return EntropyStats(
        min=float(per_module.min()),
        max=float(per_module.max()),
        mean=float(per_module.mean()),
        std=float(per_module.std(correction=0)),
        ensemble=float(_mean_entropy(ensemble_logits(logits))),
        per_module=per_module.tolist(),
    )
