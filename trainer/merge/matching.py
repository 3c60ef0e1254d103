"""Weight matching (Ainsworth et al. 2023, Git Re-Basin §3.2): align MLP B's hidden units to MLP A's
by permutations that maximize the inner product of their weights, one exact linear assignment per
hidden layer (scipy's `linear_sum_assignment`), by coordinate descent over the layers.

A permutation is an index array `perm` with B's unit `perm[i]` moved to position i, so that
B's layer k becomes W[perm_l][:, perm_{k-1}], b[perm_l]; B computes the same function after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from quorum.trainer.merge.layers import Layers, average

__all__ = ["match_average", "permute", "weight_matching"]


def permute(layers: Layers, perms: Sequence[np.ndarray]) -> Layers:
    """MLP `layers` with hidden layer k's units reordered by perms[k] (the same function)."""
    out: Layers = []
    for k, (w, b) in enumerate(layers):
        rows = torch.as_tensor(perms[k]) if k < len(perms) else torch.arange(w.shape[0])
        cols = torch.as_tensor(perms[k - 1]) if k > 0 else torch.arange(w.shape[1])
        out.append((w[rows][:, cols], b[rows]))
    return out


def weight_matching(a: Layers, b: Layers, *, max_sweeps: int = 100, seed: int = 0) -> list[np.ndarray]:
    """Permutations of b's hidden layers (index arrays, one per hidden layer) that align b to a."""
    wa = [(w.double().numpy(), c.double().numpy()) for w, c in a]
    wb = [(w.double().numpy(), c.double().numpy()) for w, c in b]
    hidden = len(a) - 1
    perms = [np.arange(wa[k][0].shape[0]) for k in range(hidden)]
    rng = np.random.default_rng(seed)

    def similarity(k: int) -> np.ndarray:
        """(H_l, H_l): A's unit i against B's unit j, over the weights into and out of layer k."""
        (w_in_a, bias_a), (w_in_b, bias_b) = wa[k], wb[k]
        cols = perms[k - 1] if k > 0 else np.arange(w_in_b.shape[1])
        sim = w_in_a @ w_in_b[:, cols].T + np.outer(bias_a, bias_b)
        rows = perms[k + 1] if k + 1 < hidden else np.arange(wb[k + 1][0].shape[0])
        return sim + wa[k + 1][0].T @ wb[k + 1][0][rows]  # (H_l, H_l)

    for _ in range(max_sweeps):
        improved = False
        for k in rng.permutation(hidden):
            sim = similarity(int(k))
            _, cols = linear_sum_assignment(sim, maximize=True)
            old, new = sim[np.arange(len(cols)), perms[k]].sum(), sim[np.arange(len(cols)), cols].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[k], improved = cols, True
        if not improved:
            break
    return perms


def match_average(models: Sequence[Layers], *, seed: int = 0) -> Layers:
    """Align every model to the first by weight matching, then average the weights."""
    aligned = [models[0], *(permute(m, weight_matching(models[0], m, seed=seed)) for m in models[1:])]
    return average(aligned)
