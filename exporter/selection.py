"""The anytime order: a permutation of the modules such that every prefix is a strong sub-ensemble,
so that `budget=b` runs the first b, chosen from every module's logits (N, M, K) and labels (N,)
on held-out data, given as numpy arrays or torch tensors.

For a classifier (`classifier_anytime_order`, what `quorum export` ships): the module with the
fewest errors first; then, up to M/4, the module that most lowers the prefix's Brier score
(proper, smooth and bounded, so a few confident mistakes do not decide a step); then, up to M/2,
the module that brings the prefix's probabilities closest to the whole ensemble's; the rest by
backward elimination from all M, so that each long prefix is the whole less what it needs least.
Regression and count targets: forward selection on the task's NLL. docs/RESULTS.md compares the
criteria. The sub-ensemble of a set S predicts from mean_{j in S} logits_j, as the runtime does.
Class specialists are chosen in `specialists`.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor

import torch

from quorum.core.tasks import Task, get_task
from quorum.exporter._candidates import ArrayLike, as_slabs, check, over_chunks, scratch, threads

__all__ = [
    "ANYTIME_CRITERION",
    "ANYTIME_SCORES",
    "FORWARD_SHARE",
    "LABELLED_SHARE",
    "TIE_RTOL",
    "classifier_anytime_order",
    "classifier_order_steps",
    "greedy_anytime_order",
]

CLASSIFICATION = get_task("classification")
ANYTIME_CRITERION = (
    "validation split: fewest errors first; greedy on the Brier score to M/4; closest to the whole ensemble's "
    "probabilities to M/2; backward elimination from all M for the rest (regression, counts: greedy on the NLL)"
)
LABELLED_SHARE = 0.25  # of the steps of a classifier's anytime order scored against the labels
FORWARD_SHARE = 0.5  # of a classifier's anytime order chosen forwards; the rest by backward elimination


def classifier_order_steps(m: int) -> tuple[int, int]:
    """`greedy_anytime_order`'s (`labelled`, `backward_above`) for a classifier of m modules, as exported."""
    return math.ceil(LABELLED_SHARE * m), max(1, int(FORWARD_SHARE * m))


ANYTIME_SCORES = ("brier", "nll")
TIE_RTOL = 1e-4  # float32 losses this close to a step's best are computed again in float64 to decide it
# exp arguments are clamped here (terms below e^-40 of the largest, 1, are nothing in a float32 sum): float32 exp
# is many times slower where it underflows, and squares of smaller terms would be subnormal, slower still
_EXP_FLOOR = -40.0
_LOG2E = 1.4426950408889634  # log2(e)
_LN2 = 0.6931471805599453  # ln(2)


def _candidate_losses(
    task: Task,
    score: str,
    total: torch.Tensor,
    cands: torch.Tensor,
    sign: int,
    size: int,
    target: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Loss of each candidate set mean (total + sign * cands_j) / size, mean over N: (C,).

    total (K, N) and cands (C, K, N), in the dtype to compute in; `out` (C, K, N) scratch space.
    Classes: target (K, N) probabilities (one-hot for labels), scored by their squared distance
    from the set's probabilities (against one-hot labels, the Brier score) or, with score "nll",
    by the cross-entropy. Other tasks: target (N, D), scored by the task's NLL.
    """
    z = torch.add(total, cands, alpha=sign, out=out)  # (C, K, N) sums
    if not task.has_classes:
        return task.nll(z.div_(size).transpose(1, 2), target).sum(dim=2).mean(dim=1)
    # in base-2 units (z / size * log2(e)): exp2 is about twice as fast as exp on the CPU, and the factor
    # folds into the scaling that is there anyway
    scale = _LOG2E / size
    shift = z.amax(dim=1, keepdim=True).mul_(-scale)  # (C, 1, N)
    z = torch.add(shift, z, alpha=scale, out=z)  # log2-probabilities up to each column's log2-normalizer, <= 0
    if score == "nll":
        z_target = torch.linalg.vecdot(z, target, dim=1).mul_(_LN2)  # (C, N), natural units
    e = z.clamp_min_(_EXP_FLOOR * _LOG2E).exp2_()
    norm = e.sum(dim=1)  # (C, N), >= 1: the largest term is 2^0
    if score == "nll":
        return (norm.log_() - z_target).mean(dim=1)
    gap = torch.addcmul(target, e, norm.reciprocal_().unsqueeze(1), value=-1, out=e)  # target - p
    return torch.linalg.vecdot(gap, gap, dim=1).mean(dim=1)


_UNDERFLOW = 2.0**-60  # a column's normalizer below this: its bound on the largest term was too loose


def _class_losses(
    score: str,
    shifted: torch.Tensor,
    cands: torch.Tensor,
    alpha: float,
    target: torch.Tensor,
    label: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor | None:
    """`_candidate_losses` for classes in float32, with no pass over the candidates to find each column's largest
    term: the inputs already have theirs at 0.

    `shifted` (K, N) is the set's summed logits in base-2 units (log2(e) / size) less each column's largest,
    and `cands` (C, K, N) the candidates' logits less each column's largest (`alpha` > 0: a module added) or
    smallest (`alpha` < 0: removed), so that every exponent shifted + alpha * cands_j is <= 0. The true
    largest term can then lie below 2^0; where it lies below 2^-60 in any column the bound was too loose
    to trust, and the answer is None. Subnormal terms must flush to zero (`flush_subnormals`), or exp2 is
    several times slower. `label` (N,): where each image's label lies in a candidate's flattened (K * N) slab,
    y * N + arange(N), when `target` is one-hot, for the Brier score as 1 - 2 p_y + |p|^2 (no pass for the
    difference); None otherwise. The NLL needs `label`.
    """
    z = torch.add(shifted, cands, alpha=alpha, out=out)  # (C, K, N) log2-probabilities up to the normalizer
    flat = z.view(len(z), -1)
    z_label = None
    if score == "nll":
        if label is None:
            raise ValueError("the NLL is scored against labels only")
        z_label = flat.index_select(1, label)  # (C, N)
    e = z.exp2_()
    norm = e.sum(dim=1)  # (C, N)
    if float(norm.min()) < _UNDERFLOW:
        return None
    if z_label is not None:
        return (norm.log2_() - z_label).mean(dim=1).mul_(_LN2)
    inv = norm.reciprocal_()
    if label is not None:  # |onehot - p|^2 = 1 - 2 p_y + |p|^2
        squares = _squares(e).mul_(inv).sub_(flat.index_select(1, label), alpha=2)
        return squares.mul_(inv).add_(1).mean(dim=1)
    gap = torch.addcmul(target, e, inv.unsqueeze(1), value=-1, out=e)  # target - p
    return _squares(gap).mean(dim=1)


def _squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over axis 1 of x (C, K, N): (C, N). Accumulated row by row, several times faster on the
    CPU than a reduction over a strided axis."""
    total = x[:, 0] * x[:, 0]
    for row in range(1, x.shape[1]):
        total.addcmul_(x[:, row], x[:, row])
    return total


@torch.no_grad()
def greedy_anytime_order(
    logits: ArrayLike,
    y: ArrayLike,
    chunk_elems: int = 1 << 20,
    *,
    progress: bool = False,
    task: Task = CLASSIFICATION,
    score: str = "brier",
    labelled: int | None = None,
    backward_above: int | None = None,
    first_by_error: bool = False,
) -> list[int]:
    """Module ids in greedy selection order on (logits (N, M, K), labels y).

    Step t adds the module j that minimizes the Brier score (`score="nll"`: the negative
    log-likelihood) of softmax((S + logits_j) / t), where S is the sum of the chosen modules'
    logits (kept incrementally). Ties go to the lower id. Each step scores every remaining
    candidate at once, in chunks of about `chunk_elems` floats (small enough to stay in cache),
    in float32; the candidates within TIE_RTOL of the best are scored again in float64, so that
    float32 rounding never decides a step. For a `task` without classes (regression, counts),
    logits are the modules' natural parameters (N, M, D), y the targets (N, D), and the score is
    the task's NLL.

    `labelled` (classification only): score only the first `labelled` steps against the labels;
    every later step adds the module that brings the prefix's probabilities closest (squared
    distance) to those of all M modules together. None: every step against the labels.

    `backward_above` (classification only): the first `backward_above` modules as above; the rest
    by backward elimination from all M, each step removing, among the modules not yet placed, the
    one whose absence leaves the remaining modules' probabilities closest to those of all M. The
    modules follow the head in the reverse order of their removal, so that every prefix longer
    than `backward_above` is all M less the modules that matter least to the whole. None: forward
    selection throughout.

    `first_by_error` (classification only): the first module is the one with the fewest argmax
    errors, the lowest id among ties; the later steps as above. A lone module's Brier score can
    favour one that is barely confident about anything over one that is often right but
    overconfident.
    """
    from tqdm.auto import tqdm

    if score not in ANYTIME_SCORES:
        raise ValueError(f"score must be one of {ANYTIME_SCORES}, got {score!r}")
    if labelled is not None and (not task.has_classes or labelled < 0):
        raise ValueError(f"labelled must be None, or >= 0 steps for a classifier; got {labelled!r} for {task.kind}")
    if backward_above is not None and (not task.has_classes or backward_above < 1):
        raise ValueError(
            f"backward_above must be None, or >= 1 module for a classifier; got {backward_above!r} for {task.kind}"
        )
    if first_by_error and not task.has_classes:
        raise ValueError(f"first_by_error is for classifiers; got {task.kind}")
    if task.has_classes:
        logits, y = check(logits, y)
    else:
        logits, y = torch.as_tensor(logits).float(), torch.as_tensor(y).float()
    n, m, k = logits.shape
    every = as_slabs(logits)  # (M, K, N)
    # each target in float32 and float64: (K, N) probabilities for classes, (N, D) values otherwise
    if task.has_classes:
        onehot = torch.zeros(k, n, dtype=torch.float64).scatter_(0, y.view(1, -1), 1.0)
        labels = (onehot.float(), onehot)
    else:
        labels = (y, y.double())
    whole = labels
    if labelled is not None or backward_above is not None:
        ensemble = torch.softmax(every.sum(dim=0, dtype=torch.float64) / m, dim=0)
        whole = (ensemble.float(), ensemble)
    switch = m if labelled is None else labelled  # the last step scored against the labels
    head = m if backward_above is None else min(backward_above, m)  # the prefix chosen forwards
    per_chunk = max(1, chunk_elems // (n * k))
    # the modules not yet placed, compacted to pool[:r]; a classifier's with each column's largest logit at 0
    pool = every - every.amax(dim=1, keepdim=True) if task.has_classes else every.clone()
    ids = torch.arange(m)
    label = y * n + torch.arange(n) if task.has_classes else None  # in a (K, N) slab flattened
    r = m

    def take(total: torch.Tensor, sign: int, size: int, against_labels: bool, workers: Executor | None) -> int:
        """Remove from the pool and return the module j for which (total + sign * logits_j) / size, the
        mean of the set with j added (sign 1) or removed (-1), has the lowest loss; the lowest id among ties."""
        nonlocal r
        target, kind = (labels, score) if against_labels else (whole, "brier")  # the whole: squared distance
        cands, total32 = pool[:r], total.float()
        if task.has_classes:  # base-2 units, each column's largest at 0: pool's columns are shifted likewise
            scale = _LOG2E / size
            shifted = total.sub(total.amax(dim=0, keepdim=True)).mul_(scale).float()

        def chunk(part: slice) -> torch.Tensor:
            out = scratch((min(per_chunk, r - part.start), *pool.shape[1:]))
            if task.has_classes:
                by_label = label if against_labels else None
                losses = _class_losses(kind, shifted, cands[part], sign * scale, target[0], by_label, out)
                if losses is not None:
                    return losses
            return _candidate_losses(task, kind, total32, cands[part], sign, size, target[0], out)

        losses = over_chunks(chunk, r, per_chunk, workers)
        best = losses.min()
        near = torch.nonzero(losses <= best + TIE_RTOL * best.abs()).flatten()
        if len(near) > 1:  # decided in float64
            again = cands[near].double()
            again = _candidate_losses(task, kind, total, again, sign, size, target[1], again)
            near = near[again == again.min()]
        i = int(near[torch.argmin(ids[near])]) if len(near) else int(torch.argmin(losses))
        j = int(ids[i])
        r -= 1
        pool[i], ids[i] = pool[r], ids[r]
        return j

    chosen: list[int] = []
    removed: list[int] = []  # the tail, by backward elimination from all M
    bar = tqdm(total=m, desc="anytime order", unit="module", disable=not progress)
    with threads() as workers:
        total = torch.zeros(k, n, dtype=torch.float64)  # the chosen modules' summed logits
        for t in range(1, head + 1):
            if t == 1 and first_by_error:
                errors = (logits.argmax(dim=-1) != y.unsqueeze(1)).sum(dim=0)  # (M,)
                j = int(torch.argmin(errors))  # argmin: the first of the lowest
                r -= 1
                pool[j], ids[j] = pool[r], ids[r]
            else:
                j = take(total, 1, t, t <= switch, workers)
            chosen.append(j)
            total += every[j]
            bar.update()
        total = every.sum(dim=0, dtype=torch.float64)
        if task.has_classes:  # removed from the set from now on: each column's smallest at 0
            pool[:r] -= pool[:r].amin(dim=1, keepdim=True)
        for size in range(m, head, -1):
            j = take(total, -1, size - 1, False, workers)
            removed.append(j)
            total -= every[j]
            bar.update()
    bar.close()
    return chosen + removed[::-1]


def classifier_anytime_order(logits: ArrayLike, y: ArrayLike, *, progress: bool = False) -> list[int]:
    """The anytime order `quorum export` ships for a classifier (ANYTIME_CRITERION) on (logits (N, M, K), y)."""
    labelled, backward_above = classifier_order_steps(torch.as_tensor(logits).shape[1])
    return greedy_anytime_order(
        logits, y, progress=progress, labelled=labelled, backward_above=backward_above, first_by_error=True
    )
