"""The selection algorithms as they were before the vectorized ones in `quorum.exporter.selection`
and `quorum.exporter.specialists`: one pass over the whole (N, C, K) block of candidate logits per
step, softmax over the trailing axis. Kept only as the reference that tests/exporter/test_selection.py
and bench/selection.py compare the product against; nothing in the package imports it.

`reference_anytime_order(..., dtype=torch.float32)` is the old order bit for bit;
`dtype=torch.float64` is the same algorithm in double precision, where float32 rounding no longer
decides near-ties (the product's definition of a step).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from quorum.exporter.selection import FORWARD_SHARE, LABELLED_SHARE
from quorum.exporter.specialists import Specialist, f1_score

__all__ = [
    "first_divergence",
    "reference_anytime_order",
    "reference_classifier_order",
    "reference_specialists",
    "validation_logits",
]


def validation_logits(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """What `quorum export` selects on: every module's logits on the run's validation split (N, M, K), and
    the labels (N,)."""
    from quorum.trainer.evaluate import module_logits
    from quorum.trainer.run import load_run
    from quorum.trainer.train import load_data

    run = load_run(run_dir, "best")
    data, _ = load_data(run.config, None)
    return module_logits(run.model, data.val.x).numpy(), data.val.y.numpy()


def _prefix_loss(score: str, mean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss of each candidate prefix mean (N, C, K) against labels y (N,) or probabilities y (N, K): (C,)."""
    p = torch.softmax(mean, dim=-1)
    if y.ndim == 2:
        return ((p * p).sum(dim=2) - 2 * (p * y.unsqueeze(1)).sum(dim=2)).mean(dim=0)
    if score == "brier":
        p_true = p.gather(2, y.view(-1, 1, 1).expand(-1, mean.shape[1], 1)).squeeze(2)
        return ((p * p).sum(dim=2) - 2 * p_true + 1).mean(dim=0)
    return -torch.log_softmax(mean, dim=-1).gather(2, y.view(-1, 1, 1).expand(-1, mean.shape[1], 1)).mean(dim=(0, 2))


@torch.no_grad()
def reference_anytime_order(
    logits: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    score: str = "brier",
    labelled: int | None = None,
    backward_above: int | None = None,
    first_by_error: bool = False,
    chunk_elems: int = 1 << 24,
    dtype: torch.dtype = torch.float32,
) -> list[int]:
    """A classifier's greedy anytime order on (logits (N, M, K), labels (N,)), as `greedy_anytime_order` defines it."""
    logits, y = torch.as_tensor(logits).to(dtype), torch.as_tensor(y).long()
    n, m, k = logits.shape
    need_ensemble = labelled is not None or backward_above is not None
    ensemble = torch.softmax(logits.mean(dim=1), dim=-1) if need_ensemble else None
    switch = m if labelled is None else labelled
    head = m if backward_above is None else min(backward_above, m)
    per_chunk = max(1, chunk_elems // (n * k))

    def best(remaining: list[int], total: torch.Tensor, sign: int, size: int, target: torch.Tensor) -> int:
        chunks = (remaining[i : i + per_chunk] for i in range(0, len(remaining), per_chunk))
        means = ((total + sign * logits[:, c]) / size for c in chunks)
        return int(torch.argmin(torch.cat([_prefix_loss(score, z, target) for z in means])))

    chosen: list[int] = []
    remaining = list(range(m))
    total = torch.zeros(n, 1, k, dtype=dtype)
    for t in range(1, head + 1):
        target = ensemble if ensemble is not None and t > switch else y
        if t == 1 and first_by_error:
            errors = (logits.argmax(dim=-1) != y.unsqueeze(1)).sum(dim=0)
            j = remaining.pop(int(torch.argmin(errors)))
        else:
            j = remaining.pop(best(remaining, total, 1, t, target))
        chosen.append(j)
        total += logits[:, j : j + 1]
    removed: list[int] = []
    total = logits.sum(dim=1, keepdim=True)
    for size in range(m, head, -1):
        assert ensemble is not None
        j = remaining.pop(best(remaining, total, -1, size - 1, ensemble))
        removed.append(j)
        total -= logits[:, j : j + 1]
    return chosen + removed[::-1]


def reference_classifier_order(
    logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32
) -> list[int]:
    """The anytime order `quorum export` ships for a classifier, by the reference algorithm."""
    m = torch.as_tensor(logits).shape[1]
    return reference_anytime_order(
        logits,
        y,
        labelled=math.ceil(LABELLED_SHARE * m),
        backward_above=max(1, int(FORWARD_SHARE * m)),
        first_by_error=True,
        dtype=dtype,
    )


def _positive(z: torch.Tensor, c: int) -> torch.Tensor:
    zc = z[c]
    positive = torch.ones_like(zc, dtype=torch.bool)
    if c > 0:
        positive &= zc > z[:c].amax(dim=0)
    if c < z.shape[0] - 1:
        positive &= zc >= z[c + 1 :].amax(dim=0)
    return positive


def _choose(z: torch.Tensor, y: torch.Tensor, c: int, t: int) -> tuple[int, tuple[float, float], torch.Tensor]:
    truth = y == c
    pos = _positive(z, c)
    tp = (pos & truth).sum(dim=1)
    fp = pos.sum(dim=1) - tp
    f1 = f1_score(tp, fp, truth.sum() - tp)
    top = torch.nonzero(f1 == f1.max()).flatten()
    log_pc = torch.log_softmax(z[:, top] / t, dim=0)[c]
    log_not = torch.log1p(-torch.exp(log_pc.clamp(max=-1e-7)))
    loss = -torch.where(truth, log_pc, log_not).mean(dim=1)
    i = int(torch.argmin(loss))
    return int(top[i]), (float(f1[top[i]]), -float(loss[i])), f1


@torch.no_grad()
def _specialist(lk: torch.Tensor, y: torch.Tensor, c: int, k: int, max_swap_rounds: int, swap_pool: int) -> Specialist:
    m = lk.shape[1]
    k = min(k, m)
    chosen: list[int] = []
    remaining = list(range(m))
    total = torch.zeros(lk.shape[0], 1, lk.shape[2])
    last_f1 = torch.zeros(0)
    for t in range(1, k + 1):
        i, _, last_f1 = _choose(total + lk.index_select(1, torch.tensor(remaining)), y, c, t)
        j = remaining.pop(i)
        last_f1 = torch.cat([last_f1[:i], last_f1[i + 1 :]])
        chosen.append(j)
        total += lk[:, j : j + 1]
    _, best, _ = _choose(total, y, c, k)
    ranked = sorted(range(len(remaining)), key=lambda r: -float(last_f1[r]))
    pool = [remaining[r] for r in ranked[:swap_pool]]
    for _ in range(max_swap_rounds):
        if not pool:
            break
        swap: tuple[int, int] | None = None
        candidates = lk.index_select(1, torch.tensor(pool))
        for pos, out in enumerate(chosen):
            i, key, _ = _choose(total - lk[:, out : out + 1] + candidates, y, c, k)
            if key > best:
                best, swap = key, (pos, i)
        if swap is None:
            break
        pos, i = swap
        out, new = chosen[pos], pool[i]
        chosen[pos], pool[i] = new, out
        total += lk[:, new : new + 1] - lk[:, out : out + 1]
    return Specialist(class_index=c, modules=chosen, f1=best[0])


def reference_specialists(
    logits: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    k: int = 20,
    max_swap_rounds: int = 3,
    swap_pool: int = 48,
) -> list[Specialist]:
    """`select_specialists` by the reference algorithm: every class's specialist, in class order."""
    logits, y = torch.as_tensor(logits).float(), torch.as_tensor(y).long()
    lk = logits.permute(2, 1, 0).contiguous()  # (K, M, N)
    return [_specialist(lk, y, c, k, max_swap_rounds, swap_pool) for c in range(logits.shape[2])]


@torch.no_grad()
def first_divergence(
    a: list[int], b: list[int], logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor
) -> tuple[int, int, int, float, float] | None:
    """Where two classifier anytime orders (`quorum export`'s criterion) first choose differently, in the
    order the steps are taken, with the state before it common to both: (position, a's module, b's module,
    a's loss, b's loss), the losses in float64; None if the orders are equal."""
    if a == b:
        return None
    logits, y = torch.as_tensor(logits).double(), torch.as_tensor(y).long()
    m = logits.shape[1]
    labelled, head = math.ceil(LABELLED_SHARE * m), max(1, int(FORWARD_SHARE * m))
    ensemble = torch.softmax(logits.mean(dim=1), dim=-1)

    def losses(prefix: list[int], sign: int, picks: tuple[int, int], target: torch.Tensor) -> list[float]:
        total = logits[:, prefix].sum(dim=1, keepdim=True)
        mean = (total + sign * logits[:, list(picks)]) / (len(prefix) + sign)
        return _prefix_loss("brier", mean, target).tolist()

    for pos in range(head):  # forward steps: the first by errors (no loss), then the Brier score, then the whole
        if a[pos] != b[pos]:
            target = y if pos < labelled else ensemble
            la, lb = losses(a[:pos], 1, (a[pos], b[pos]), target) if pos else (float("nan"), float("nan"))
            return pos, a[pos], b[pos], la, lb
    for size in range(m, head, -1):  # backward steps remove position size - 1 from the first size modules
        pos = size - 1
        if a[pos] != b[pos]:
            la, lb = losses(a[:size], -1, (a[pos], b[pos]), ensemble)
            return pos, a[pos], b[pos], la, lb
    raise AssertionError("unreachable: the orders differ")
