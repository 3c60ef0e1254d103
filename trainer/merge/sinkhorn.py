"""The Sinkhorn operator (permAVG thesis eq. 33, after Mena et al. 2018).

S(X/τ): exp, then alternate row and column normalizations for a fixed number of iterations.
Done in the log domain (logsumexp), which is the same arithmetic without overflow when the
learned cost matrices grow: exp(X/τ) of a cost of 100 is already inf in float32.
"""

from __future__ import annotations

import torch

__all__ = ["sinkhorn"]


def sinkhorn(cost: torch.Tensor, tau: float = 1.0, iterations: int = 100) -> torch.Tensor:
    """Doubly stochastic matrices S(cost/τ) of square cost matrices (..., n, n), differentiably.

    As τ → 0 the result tends to the permutation matrix that maximizes tr(Pᵀ cost) (the hard
    assignment); larger τ spreads each row's mass towards uniform.
    """
    if cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"Sinkhorn needs square matrices, got shape {tuple(cost.shape)}")
    if not tau > 0 or iterations < 1:
        raise ValueError(f"Sinkhorn needs tau > 0 and iterations >= 1, got {tau} and {iterations}")
    log_p = cost / tau
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1 (T_r)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1 (T_c)
    return log_p.exp()
