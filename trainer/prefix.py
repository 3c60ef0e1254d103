"""Prefix-aware objectives: the modular loss plus the NLL of the sub-ensembles that serving runs.

`budget=b` serves the first b modules of an order. L_λ trains only the two extremes (all M
together, λ; each alone, 1 − λ); these losses add the combined NLL of prefixes of lengths
b ∈ {1, 2, 4, …, M} (and M itself when M is not a power of two):

    L = L_λ + μ · Σ_b c_b · NLL(mean_{i<b} η_{π(i)}, y),    c_b = w_b · b / M,    Σ_b w_b = 1

- `prefix`: π is the module index order 0..M−1, which export can ship as the anytime order;
- `dropout`: π is a new random permutation every step, so each prefix is a uniformly random
  subset of its size (module dropout: trains for random removal rather than for one order).

The factor b / M: NLL(mean of b modules) reaches each of them with weight 1/b, while the
trainer's rate is a per-module rate times M (eq. 8 gives the whole ensemble's term 1/M). With
c_b = w_b·b/M each prefix's mean moves at w_b times the rate the whole ensemble's mean does under
L_1, and module π(0), in every prefix, at most at μ times a lone module's rate: the default rate
0.02·M stays stable whatever M.

Weights w_b (`--prefix-weights`): `uniform`, 1/n over the n lengths; `small`, w_b ∝ 1/b, so every
prefix's NLL weighs the same in the loss (as MSDNet weights its exits and Matryoshka its nested
sizes) and half the weight goes to budget 1. All prefix means come from one cumulative sum over
the module axis: O(B·M·K) on top of L_λ (`python bench/prefix_loss.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quorum.core.tasks import Task
from quorum.trainer.errors import ConfigError

__all__ = [
    "PREFIX_LOSSES",
    "PREFIX_WEIGHTS",
    "prefix_coefficients",
    "prefix_lengths",
    "prefix_loss",
    "prefix_nll",
    "prefix_objective",
]

PREFIX_LOSSES = ("prefix", "dropout")  # the losses of this module: fixed order, random order per step
PREFIX_WEIGHTS = ("uniform", "small")  # schedules of w_b over the prefix lengths

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prefix_lengths(m: int) -> list[int]:
    """The trained prefix lengths of an ensemble of m modules: 1, 2, 4, … below m, then m."""
    if m < 1:
        raise ConfigError(f"an ensemble has at least one module, got M = {m}")
    lengths, b = [], 1
    while b < m:
        lengths.append(b)
        b *= 2
    return [*lengths, m]


def prefix_coefficients(m: int, weights: str = "uniform", scale: float = 1.0) -> tuple[list[int], list[float]]:
    """The prefix lengths b of m modules and each one's coefficient μ·w_b·b/m in the loss (module docstring)."""
    lengths = prefix_lengths(m)
    if weights == "uniform":
        w = [1.0] * len(lengths)
    elif weights == "small":
        w = [1.0 / b for b in lengths]
    else:
        raise ConfigError(f"unknown --prefix-weights {weights!r}; choose one of {', '.join(PREFIX_WEIGHTS)}")
    total = sum(w)
    return lengths, [scale * wb / total * b / m for wb, b in zip(w, lengths, strict=True)]


def prefix_nll(task: Task, eta: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Batch-mean NLL of each prefix's combined prediction: eta (B, M, K) (or (B, M) for one output),
    `lengths` (n,) int64 on eta's device -> (n,)."""
    csum = eta.cumsum(dim=1)  # (B, M, K): csum[:, i] = sum of the first i + 1 modules
    shape = (1, -1) + (1,) * (eta.dim() - 2)
    means = csum.index_select(1, lengths - 1) / lengths.to(eta.dtype).view(shape)  # (B, n, K)
    return task.combined_nll(means, y).mean(dim=0)


def prefix_loss(
    task: Task,
    eta: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    lengths: torch.Tensor,
    coefs: torch.Tensor,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_λ + Σ_b coefs_b · NLL(prefix of length lengths_b) on eta (B, M, K), the prefixes taken in
    `order` (a permutation (M,) of the module axis; None: index order)."""
    ordered = eta if order is None else eta.index_select(1, order)
    return task.modular_loss(eta, y, lam) + (prefix_nll(task, ordered, y, lengths) * coefs).sum()


def prefix_objective(
    task: Task, lam: float, m: int, weights: str, scale: float, shuffle: torch.Generator | None = None
) -> LossFn:
    """The training loss (eta, y) -> scalar of `--loss prefix` (shuffle None) or `--loss dropout` (a new
    order drawn from `shuffle`, on the CPU, every call)."""
    lengths_list, coefs_list = prefix_coefficients(m, weights, scale)
    cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def loss(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if eta.device not in cache:
            cache[eta.device] = (
                torch.tensor(lengths_list, device=eta.device),
                torch.tensor(coefs_list, device=eta.device, dtype=eta.dtype),
            )
        lengths, coefs = cache[eta.device]
        order = None if shuffle is None else torch.randperm(m, generator=shuffle).to(eta.device, non_blocking=True)
        return prefix_loss(task, eta, y, lam, lengths, coefs.to(eta.dtype), order)

    return loss
