"""Selection of sub-ensembles from every module's logits on held-out data.

Two questions, both answered from every module's logits (N, M, K) and labels (N,), given as
numpy arrays or torch tensors (the work runs in torch: thousands of candidate sub-ensembles
are scored per step):

- **Anytime order** (`greedy_anytime_order`): a permutation of the modules such that every
  prefix is a strong sub-ensemble, so that `budget=b` runs the first b. For a classifier
  (`classifier_anytime_order`, what `quorum export` ships): the module with the fewest errors
  first; then, up to M/4, the module that most lowers the prefix's Brier score (proper, smooth
  and bounded, so a few confident mistakes do not decide a step); then, up to M/2, the module
  that brings the prefix's probabilities closest to the whole ensemble's; the rest by backward
  elimination from all M, so that each long prefix is the whole less what it needs least.
  Regression and count targets: forward selection on the task's NLL. docs/RESULTS.md compares
  the criteria.
- **Specialists** (`greedy_specialist`, `best_of_random_specialist`): for class c as a
  one-vs-all problem (positive when the sub-ensemble's argmax is c), a k-subset with high
  F1. The paper picks the best of 200 random k-subsets; ours grows the subset greedily on
  F1 and then improves it by single swaps with the most promising non-members.

The sub-ensemble of a set S predicts the task's answer from mean_{j in S} logits_j, as the runtime does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quorum.core.tasks import Task, get_task

__all__ = [
    "ANYTIME_CRITERION",
    "ANYTIME_SCORES",
    "FORWARD_SHARE",
    "LABELLED_SHARE",
    "SPECIALIST_CRITERION",
    "Specialist",
    "best_of_random_specialist",
    "classifier_anytime_order",
    "classifier_order_steps",
    "ensemble_f1",
    "f1_score",
    "greedy_anytime_order",
    "greedy_specialist",
    "one_vs_all_counts",
    "random_subsets_f1",
    "select_specialists",
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
SPECIALIST_CRITERION = (
    "one-vs-all F1 (positive = argmax is the class) on the validation split: greedy forward selection, "
    "then single swaps until none improves F1; ties broken by the class's binary log-loss"
)

ArrayLike = np.ndarray | torch.Tensor


def _check(logits: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    y = torch.as_tensor(y).long()
    if logits.ndim != 3 or tuple(y.shape) != (logits.shape[0],):
        raise ValueError(f"need logits (N, M, K) and labels (N,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    return logits, y


@torch.no_grad()
def _prefix_loss(task: Task, score: str, mean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss of each candidate prefix mean (N, C, D) against targets y, mean over N: (C,).

    Classes: y (N,) labels, mean = logits, and the Brier score or the NLL (`score`); or y (N, K)
    target probabilities, and the squared distance of the prefix's probabilities from them.
    Other tasks: y (N, D), mean = natural parameters, and the task's NLL up to constants."""
    if task.has_classes:
        if y.ndim == 2:  # soft targets: sum_k (p_k - q_k)^2 up to the constant sum_k q_k^2
            p = torch.softmax(mean, dim=-1)
            return ((p * p).sum(dim=2) - 2 * (p * y.unsqueeze(1)).sum(dim=2)).mean(dim=0)
        if score == "brier":
            p = torch.softmax(mean, dim=-1)
            p_true = p.gather(2, y.view(-1, 1, 1).expand(-1, mean.shape[1], 1)).squeeze(2)
            return ((p * p).sum(dim=2) - 2 * p_true + 1).mean(dim=0)  # sum_k (p_k - [k = y])^2
        return (
            -torch.log_softmax(mean, dim=-1).gather(2, y.view(-1, 1, 1).expand(-1, mean.shape[1], 1)).mean(dim=(0, 2))
        )
    return task.nll(mean, y.unsqueeze(1)).sum(dim=2).mean(dim=0)


def greedy_anytime_order(
    logits: ArrayLike,
    y: ArrayLike,
    chunk_elems: int = 1 << 24,
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
    logits. Ties go to the lower id. O(M^2 N K) work, done in chunks of candidates so that
    memory stays near `chunk_elems` floats. For a `task` without classes
    (regression, counts), logits are the modules' natural parameters (N, M, D), y the targets (N, D),
    and the score is the task's NLL.

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
        logits, y = _check(logits, y)
    else:
        logits, y = torch.as_tensor(logits).float(), torch.as_tensor(y).float()
    n, m, k = logits.shape
    need_ensemble = labelled is not None or backward_above is not None
    ensemble = torch.softmax(logits.mean(dim=1), dim=-1) if need_ensemble else None  # (N, K)
    switch = m if labelled is None else labelled  # the last step scored against the labels
    head = m if backward_above is None else min(backward_above, m)  # the prefix chosen forwards
    per_chunk = max(1, chunk_elems // (n * k))

    def best(remaining: list[int], total: torch.Tensor, sign: int, size: int, target: torch.Tensor) -> int:
        """Index into `remaining` of the j for which (total + sign * logits_j) / size, the mean of the set
        with j added (sign 1) or removed (-1), has the lowest loss; the first among ties."""
        chunks = (remaining[i : i + per_chunk] for i in range(0, len(remaining), per_chunk))
        means = ((total + sign * logits[:, c]) / size for c in chunks)
        return int(torch.argmin(torch.cat([_prefix_loss(task, score, z, target) for z in means])))

    chosen: list[int] = []
    remaining = list(range(m))
    total = torch.zeros(n, 1, k)
    bar = tqdm(total=m, desc="anytime order", unit="module", disable=not progress)
    for t in range(1, head + 1):
        target = ensemble if ensemble is not None and t > switch else y
        if t == 1 and first_by_error:
            errors = (logits.argmax(dim=-1) != y.unsqueeze(1)).sum(dim=0)  # (M,)
            j = remaining.pop(int(torch.argmin(errors)))  # argmin: the first of the lowest
        else:
            j = remaining.pop(best(remaining, total, 1, t, target))
        chosen.append(j)
        total += logits[:, j : j + 1]
        bar.update()
    removed: list[int] = []  # the tail, by backward elimination from all M
    total = logits.sum(dim=1, keepdim=True)
    for size in range(m, head, -1):
        assert ensemble is not None  # a tail exists only with backward_above
        j = remaining.pop(best(remaining, total, -1, size - 1, ensemble))
        removed.append(j)
        total -= logits[:, j : j + 1]
        bar.update()
    bar.close()
    return chosen + removed[::-1]


def classifier_anytime_order(logits: ArrayLike, y: ArrayLike, *, progress: bool = False) -> list[int]:
    """The anytime order `quorum export` ships for a classifier (ANYTIME_CRITERION) on (logits (N, M, K), y)."""
    labelled, backward_above = classifier_order_steps(torch.as_tensor(logits).shape[1])
    return greedy_anytime_order(
        logits, y, progress=progress, labelled=labelled, backward_above=backward_above, first_by_error=True
    )


# ---------------------------------------------------------------- one-vs-all F1


def one_vs_all_counts(pred: ArrayLike, y: ArrayLike, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives and false negatives of `pred == c` against `y == c`.

    `pred` is (N,) or (N, C) for C candidate predictors at once; the counts are per column.
    """
    pred, y = torch.as_tensor(pred), torch.as_tensor(y)
    truth = (y == c).unsqueeze(1) if pred.ndim == 2 else y == c
    positive = pred == c
    tp = (positive & truth).sum(dim=0)
    fp = (positive & ~truth).sum(dim=0)
    fn = (~positive & truth).sum(dim=0)
    return tp, fp, fn


def f1_score(tp: ArrayLike, fp: ArrayLike, fn: ArrayLike) -> torch.Tensor:
    """F1 = 2TP / (2TP + FP + FN); 0 where there is nothing positive at all."""
    tp, fp, fn = (torch.as_tensor(a, dtype=torch.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom))


def ensemble_f1(logits: ArrayLike, y: ArrayLike, c: int, subset: Sequence[int] | None = None) -> float:
    """F1 of class c's one-vs-all problem for the sub-ensemble `subset` (default: all modules)."""
    logits, y = _check(logits, y)
    chosen = logits if subset is None else logits[:, list(subset)]
    pred = chosen.mean(dim=1).argmax(dim=-1)
    return float(f1_score(*one_vs_all_counts(pred, y, c)))


@dataclass(frozen=True)
class Specialist:
    """A sub-ensemble chosen for class c, with its F1 on the data it was chosen on."""

    class_index: int
    modules: list[int]  # module ids, in the order they were added
    f1: float


def _positive(z: torch.Tensor, c: int) -> torch.Tensor:
    """argmax == c over the first axis of z (K, C, N), as torch.argmax decides ties (first index).

    Reducing over the outermost axis is an elementwise max of K contiguous slabs: several times
    faster than an argmax over a trailing axis of 10.
    """
    zc = z[c]
    positive = torch.ones_like(zc, dtype=torch.bool)
    if c > 0:
        positive &= zc > z[:c].amax(dim=0)
    if c < z.shape[0] - 1:
        positive &= zc >= z[c + 1 :].amax(dim=0)
    return positive


def _choose(z: torch.Tensor, y: torch.Tensor, c: int, t: int) -> tuple[int, tuple[float, float], torch.Tensor]:
    """The best of C candidate sub-ensembles of t members, z (K, C, N) being their summed logits.

    Best = highest F1, ties broken by the lower mean binary log-loss of p(c) under the mean
    logits z / t (computed only for the tied candidates: the argmax alone decides F1). Returns
    its index, its key (F1, -log-loss), which orders candidates (larger is better), and every
    candidate's F1.
    """
    truth = y == c
    pos = _positive(z, c)  # (C, N)
    tp = (pos & truth).sum(dim=1)
    fp = pos.sum(dim=1) - tp
    f1 = f1_score(tp, fp, truth.sum() - tp)
    top = torch.nonzero(f1 == f1.max()).flatten()
    log_pc = torch.log_softmax(z[:, top] / t, dim=0)[c]  # (T, N)
    log_not = torch.log1p(-torch.exp(log_pc.clamp(max=-1e-7)))
    loss = -torch.where(truth, log_pc, log_not).mean(dim=1)
    i = int(torch.argmin(loss))
    return int(top[i]), (float(f1[top[i]]), -float(loss[i])), f1


@torch.no_grad()
def greedy_specialist(
    logits: ArrayLike, y: ArrayLike, c: int, k: int = 20, max_swap_rounds: int = 3, swap_pool: int = 48
) -> Specialist:
    """Class c's specialist k-subset: greedy forward selection on F1, then single-swap refinement.

    Forward step t adds the module whose addition gives the highest F1 (ties: lower binary
    log-loss of p(c)). Then each round tries replacing every member by each of the `swap_pool`
    non-members that scored best as the last member added, and makes the best swap if it
    raises F1 (or keeps F1 and lowers the log-loss); it stops when no swap helps or after
    `max_swap_rounds` rounds. The pool bounds the cost: every candidate costs a pass over the
    N x K logits, and the modules that were useless as the k-th member rarely become useful.
    """
    logits, y = _check(logits, y)
    lk = logits.permute(2, 1, 0).contiguous()  # (K, M, N): candidates are slabs along axis 1
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
    ranked = sorted(range(len(remaining)), key=lambda r: -float(last_f1[r]))  # stable: lower id first among ties
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


def _random_subsets(m: int, k: int, tries: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(m, size=min(k, m), replace=False) for _ in range(tries)]


@torch.no_grad()
def random_subsets_f1(
    logits: ArrayLike, y: ArrayLike, c: int, k: int = 20, tries: int = 200, seed: int = 0
) -> torch.Tensor:
    """F1 of class c for each of `tries` random k-subsets (the same subsets for the same seed)."""
    logits, y = _check(logits, y)
    n, m, num_classes = logits.shape
    members = torch.zeros(m, tries)  # column s: the indicator of subset s
    for s, subset in enumerate(_random_subsets(m, k, tries, seed)):
        members[subset, s] = 1.0
    sums = (logits.transpose(1, 2).reshape(n * num_classes, m) @ members).view(n, num_classes, tries)
    return f1_score(*one_vs_all_counts(sums.argmax(dim=1), y, c))  # argmax of a sum = of the mean


@torch.no_grad()
def best_of_random_specialist(
    logits: ArrayLike, y: ArrayLike, c: int, k: int = 20, tries: int = 200, seed: int = 0
) -> Specialist:
    """The paper's selection: the best F1 among `tries` random k-subsets (Webb et al. §4.1)."""
    logits, y = _check(logits, y)
    f1 = random_subsets_f1(logits, y, c, k, tries, seed)
    best = int(torch.argmax(f1))
    subset = _random_subsets(logits.shape[1], k, tries, seed)[best]
    return Specialist(class_index=c, modules=[int(j) for j in subset], f1=float(f1[best]))


def select_specialists(logits: ArrayLike, y: ArrayLike, k: int = 20, *, progress: bool = False) -> list[Specialist]:
    """`greedy_specialist` for every class 0..K-1, in class order."""
    from tqdm.auto import tqdm

    logits, y = _check(logits, y)
    classes = range(logits.shape[2])
    return [
        greedy_specialist(logits, y, c, k)
        for c in tqdm(classes, desc="specialists", unit="class", disable=not progress)
    ]
