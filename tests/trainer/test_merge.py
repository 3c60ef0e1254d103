"""Merging MLPs (trainer/merge): weight matching, the Sinkhorn operator, permAVG's averaged layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from quorum.trainer.merge import PermAvg, average, forward, match_average, permute, sinkhorn, weight_matching


def _mlp(widths: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, a, generator=g) / a**0.5, 0.1 * torch.randn(b, generator=g))
        for a, b in itertools.pairwise(widths)
    ]


@pytest.mark.parametrize("widths", [[20, 16, 10], [20, 16, 12, 10], [20, 16, 12, 8, 10]])
def test_a_permuted_copy_of_a_network_is_recovered_exactly_by_weight_matching(widths):
    a = _mlp(widths, seed=0)
    rng = np.random.default_rng(1)
    scrambled = permute(a, [rng.permutation(h) for h in widths[1:-1]])
    x = torch.randn(7, widths[0])
    torch.testing.assert_close(forward(scrambled, x), forward(a, x))  # the same function, other weights
    assert not torch.equal(scrambled[0][0], a[0][0])
    recovered = permute(scrambled, weight_matching(a, scrambled))
    for (w, b), (w0, b0) in zip(recovered, a, strict=True):
        assert torch.equal(w, w0) and torch.equal(b, b0)
    merged = match_average([a, scrambled])
    assert all(torch.equal(w, w0) for (w, _), (w0, _) in zip(merged, a, strict=True))
    naive = average([a, scrambled])
    assert (forward(naive, x) - forward(a, x)).abs().max() > 0.1  # averaging unaligned copies breaks the net


def test_sinkhorn_output_is_doubly_stochastic():
    cost = torch.randn(5, 12, 12, generator=torch.Generator().manual_seed(0)) * 3
    p = sinkhorn(cost, tau=1.0, iterations=100)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 12), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(5, 12), atol=1e-4, rtol=0)


def test_as_tau_goes_to_zero_the_soft_permutation_tends_to_the_hard_assignment():
    cost = torch.randn(10, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)  # argmax_P tr(Pᵀ cost)
    hard = torch.zeros(10, 10, dtype=torch.float64)
    hard[rows, cols] = 1.0
    gaps = [(sinkhorn(cost, tau=tau, iterations=2000) - hard).abs().max().item() for tau in (1.0, 0.3, 0.1, 0.01)]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert gaps[0] > 0.3 and gaps[-1] < 1e-2, gaps


def test_permavg_layers_are_the_average_of_the_permuted_networks():
    """With costs sharp at the permutation that aligns B to A, permAVG of (A, B) is A's function."""
    widths = [20, 16, 12, 10]
    a = _mlp(widths, seed=0)
    rng = np.random.default_rng(2)
    perms = [rng.permutation(h) for h in widths[1:-1]]
    b = permute(a, perms)
    net = PermAvg([a, b], tau=1.0, iterations=100)
    with torch.no_grad():
        for cost, perm in zip(net.costs, perms, strict=True):
            # B's unit perm[i] sits at position i of A: b = P a with P[perm[i], i] = 1; undo it with Pᵀ
            undo = torch.zeros_like(cost[0])
            undo[np.arange(len(perm)), np.argsort(perm)] = 1.0
            cost.copy_(40.0 * undo.unsqueeze(0))
    x = torch.randn(9, widths[0])
    with torch.no_grad():
        torch.testing.assert_close(net(x), forward(a, x), atol=1e-4, rtol=1e-4)
        identity = PermAvg([a, b])  # costs at the identity, as the thesis starts: far from A
        assert (identity(x) - forward(a, x)).abs().max() > 0.1
