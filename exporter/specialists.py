"""Class specialists: for class c as a one-vs-all problem (positive when the sub-ensemble's argmax is c),
a k-subset of the modules with high F1, from every module's logits (N, M, K) and labels (N,) on
held-out data, given as numpy arrays or torch tensors.

The paper picks the best of 200 random k-subsets (`best_of_random_specialist`); ours
(`greedy_specialist`, `select_specialists`, what `quorum export` ships) grows the subset
greedily on F1 and then improves it by single swaps with the most promising non-members.
The sub-ensemble of a set S predicts from mean_{j in S} logits_j, as the runtime does.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from quorum.exporter._candidates import ArrayLike, as_slabs, check, over_chunks, threads

__all__ = [
    "SPECIALIST_CRITERION",
    "Specialist",
    "best_of_random_specialist",
    "ensemble_f1",
    "f1_score",
    "greedy_specialist",
    "one_vs_all_counts",
    "random_subsets_f1",
    "random_subsets_f1_by_class",
    "select_specialists",
]

GROUP = 32  # candidates scored together, on the images that the extremes of their logits leave undecided
SPECIALIST_CRITERION = (
    "one-vs-all F1 (positive = argmax is the class) on the validation split: greedy forward selection, "
    "then single swaps until none improves F1; ties broken by the class's binary log-loss"
)


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
    logits, y = check(logits, y)
    chosen = logits if subset is None else logits[:, list(subset)]
    pred = chosen.mean(dim=1).argmax(dim=-1)
    return float(f1_score(*one_vs_all_counts(pred, y, c)))


@dataclass(frozen=True)
class Specialist:
    """A sub-ensemble chosen for class c, with its F1 on the data it was chosen on."""

    class_index: int
    modules: list[int]  # module ids, in the order they were added
    f1: float


def _positive(z: torch.Tensor, c: int, others: torch.Tensor | None = None, dim: int = 1) -> torch.Tensor:
    """argmax == c over the classes, axis `dim` of z (e.g. (C, K, N): (C, N)), as torch.argmax decides ties
    (first index). With `others` (the shape of z): where z's class c beats every other class of `others` so.

    The reduction over K is an elementwise max of K rows of N: several times faster than an
    argmax over a trailing axis of 10.
    """
    rest, k = z if others is None else others, z.shape[dim]
    zc = z.select(dim, c)
    positive = torch.ones_like(zc, dtype=torch.bool)
    if c > 0:
        positive &= zc > rest.narrow(dim, 0, c).amax(dim=dim)
    if c < k - 1:
        positive &= zc >= rest.narrow(dim, c + 1, k - c - 1).amax(dim=dim)
    return positive


class _Candidates:
    """Candidate modules' logits as slabs (C, K, N), in groups of `group` consecutive slabs with each
    group's least and greatest logit (G, K, N): bounds on what adding any one member can do. Each group
    is kept a second time as (K, N, g), each image's g logits of a class one run, so that a subset of the
    images is a gather of runs."""

    def __init__(self, slabs: torch.Tensor, group: int) -> None:
        self.slabs, self.group = slabs, group
        parts = [slabs[a : a + group] for a in range(0, slabs.shape[0], group)]
        self.low = torch.stack([part.amin(dim=0) for part in parts])
        self.high = torch.stack([part.amax(dim=0) for part in parts])
        self.image_runs = [part.permute(1, 2, 0).contiguous() for part in parts]


@dataclass(frozen=True)
class _OneVsAll:
    """Class c's one-vs-all problem on the labels y, candidates scored group by group on `workers`."""

    y: torch.Tensor
    c: int
    workers: Executor | None

    def f1(self, base: torch.Tensor, cands: _Candidates) -> torch.Tensor:
        """F1 of each sub-ensemble base + slab_j, base (K, N) summed logits: (C,).

        Each group is counted only on the images whose answer one of its members can change:
        float addition is monotone, so where c wins (or loses) both between base + low and base +
        high, it wins (loses) for every member, bit for bit as the full sums would say.
        """
        c, truth = self.c, self.y == self.c

        def counts(part: slice) -> torch.Tensor:
            g = part.start // cands.group
            least, most = base + cands.low[g], base + cands.high[g]
            sure = _positive(least, c, others=most, dim=0)
            maybe = _positive(most, c, others=least, dim=0)
            undecided = torch.nonzero(maybe & ~sure).flatten()  # (U,)
            z = cands.image_runs[g].index_select(1, undecided)  # (K, U, g): runs, several times faster than columns
            z.add_(base.index_select(1, undecided).unsqueeze(2))
            pos = _positive(z, c, dim=0)  # (U, g)
            tp = (pos & truth.index_select(0, undecided).unsqueeze(1)).sum(dim=0) + torch.count_nonzero(sure & truth)
            return torch.stack([tp, pos.sum(dim=0) + torch.count_nonzero(sure)], dim=1)  # (g, 2): TP, positives

        tp, positives = over_chunks(counts, cands.slabs.shape[0], cands.group, self.workers).unbind(dim=1)
        return f1_score(tp, positives - tp, truth.sum() - tp)

    def log_loss(self, base: torch.Tensor, slabs: torch.Tensor, t: int) -> torch.Tensor:
        """Mean binary log-loss of p(c) under the mean logits (base + slab_j) / t of C sets: (C,)."""
        z = torch.empty(slabs.shape[1], slabs.shape[0], slabs.shape[2])  # (K, C, N): reduced bit for bit as before
        torch.add(base.unsqueeze(1), slabs.transpose(0, 1), out=z)
        log_pc = torch.log_softmax(z / t, dim=0)[self.c]  # (C, N)
        log_not = torch.log1p(-torch.exp(log_pc.clamp(max=-1e-7)))
        return -torch.where(self.y == self.c, log_pc, log_not).mean(dim=1)

    def choose(
        self, base: torch.Tensor, cands: _Candidates, t: int, skip: Sequence[int] = ()
    ) -> tuple[int, tuple[float, float], torch.Tensor]:
        """The best of the C sets base + slab_j of t members, base (K, N) summed logits, leaving out the
        indices `skip`.

        Best = highest F1, ties broken by the lower mean binary log-loss of p(c) under the mean
        logits / t (computed only for the tied candidates: the argmax alone decides F1), then by
        the lower index. Returns its index, its key (F1, -log-loss), which orders candidates
        (larger is better), and every candidate's F1 (-1 at `skip`).
        """
        f1 = self.f1(base, cands)
        f1[list(skip)] = -1.0
        top = torch.nonzero(f1 == f1.max()).flatten()
        loss = self.log_loss(base, cands.slabs[top], t)
        i = int(torch.argmin(loss))
        return int(top[i]), (float(f1[top[i]]), -float(loss[i])), f1


@torch.no_grad()
def greedy_specialist(
    logits: ArrayLike,
    y: ArrayLike,
    c: int,
    k: int = 20,
    max_swap_rounds: int = 3,
    swap_pool: int = 48,
) -> Specialist:
    """Class c's specialist k-subset: greedy forward selection on F1, then single-swap refinement.

    Forward step t adds the module whose addition gives the highest F1 (ties: lower binary
    log-loss of p(c)). Then each round tries replacing every member by each of the `swap_pool`
    non-members that scored best as the last member added, and makes the best swap if it
    raises F1 (or keeps F1 and lowers the log-loss); it stops when no swap helps or after
    `max_swap_rounds` rounds. The pool bounds the cost: every candidate costs a pass over the
    N x K logits, and the modules that were useless as the k-th member rarely become useful.
    Candidates are scored in groups of GROUP, each group only on the images whose answer one of
    its members can still change.
    """
    return select_specialists(logits, y, k, classes=[c], max_swap_rounds=max_swap_rounds, swap_pool=swap_pool)[0]


def _greedy_specialist(
    every: _Candidates, problem: _OneVsAll, k: int, max_swap_rounds: int, swap_pool: int
) -> Specialist:
    """`greedy_specialist` on every module's logits as candidates."""
    slabs = every.slabs  # (M, K, N)
    m = slabs.shape[0]
    k = min(k, m)
    chosen: list[int] = []
    total = torch.zeros(slabs.shape[1:])  # (K, N), summed in the order the members were added
    f1 = torch.zeros(0)
    for t in range(1, k + 1):  # every module is scored (groups are slices); members are left out
        j, _, f1 = problem.choose(total, every, t, skip=chosen)
        chosen.append(j)
        total += slabs[j]
    _, best, _ = problem.choose(total, _Candidates(torch.zeros_like(slabs[:1]), 1), k)
    rest = [j for j in range(m) if j not in chosen]
    pool = sorted(rest, key=lambda j: -float(f1[j]))[:swap_pool]  # stable: lower id first among ties
    for _ in range(max_swap_rounds):
        if not pool:
            break
        swap: tuple[int, int] | None = None
        candidates = _Candidates(slabs[pool], every.group)
        for pos, out in enumerate(chosen):
            i, key, _ = problem.choose(total - slabs[out], candidates, k)
            if key > best:
                best, swap = key, (pos, i)
        if swap is None:
            break
        pos, i = swap
        out, new = chosen[pos], pool[i]
        chosen[pos], pool[i] = new, out
        total += slabs[new] - slabs[out]
    return Specialist(class_index=problem.c, modules=chosen, f1=best[0])


def _random_subsets(m: int, k: int, tries: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(m, size=min(k, m), replace=False) for _ in range(tries)]


@torch.no_grad()
def random_subsets_f1(
    logits: ArrayLike, y: ArrayLike, c: int, k: int = 20, tries: int = 200, seed: int = 0
) -> torch.Tensor:
    """F1 of class c for each of `tries` random k-subsets (the same subsets for the same seed)."""
    return random_subsets_f1_by_class(logits, y, [c], k, tries, seed)[0]


@torch.no_grad()
def random_subsets_f1_by_class(
    logits: ArrayLike, y: ArrayLike, classes: Sequence[int], k: int = 20, tries: int = 200, seed: int = 0
) -> torch.Tensor:
    """`random_subsets_f1` of each of `classes` on the same subsets: (len(classes), tries). The subsets'
    answers are computed once for every class."""
    logits, y = check(logits, y)
    n, m, num_classes = logits.shape
    members = torch.zeros(m, tries)  # column s: the indicator of subset s
    for s, subset in enumerate(_random_subsets(m, k, tries, seed)):
        members[subset, s] = 1.0
    sums = (logits.transpose(1, 2).reshape(n * num_classes, m) @ members).view(n, num_classes, tries)
    pred = sums.argmax(dim=1)  # argmax of a sum = of the mean
    return torch.stack([f1_score(*one_vs_all_counts(pred, y, c)) for c in classes])


@torch.no_grad()
def best_of_random_specialist(
    logits: ArrayLike, y: ArrayLike, c: int, k: int = 20, tries: int = 200, seed: int = 0
) -> Specialist:
    """The paper's selection: the best F1 among `tries` random k-subsets (Webb et al. §4.1)."""
    logits, y = check(logits, y)
    f1 = random_subsets_f1(logits, y, c, k, tries, seed)
    best = int(torch.argmax(f1))
    subset = _random_subsets(logits.shape[1], k, tries, seed)[best]
    return Specialist(class_index=c, modules=[int(j) for j in subset], f1=float(f1[best]))


def select_specialists(
    logits: ArrayLike,
    y: ArrayLike,
    k: int = 20,
    *,
    classes: Sequence[int] | None = None,
    max_swap_rounds: int = 3,
    swap_pool: int = 48,
    progress: bool = False,
) -> list[Specialist]:
    """`greedy_specialist` for each of `classes` (default: every class 0..K-1), in that order."""
    from tqdm.auto import tqdm

    logits, y = check(logits, y)
    every = _Candidates(as_slabs(logits), GROUP)
    chosen = range(logits.shape[2]) if classes is None else classes
    with torch.no_grad(), threads() as workers:
        return [
            _greedy_specialist(every, _OneVsAll(y, c, workers), k, max_swap_rounds, swap_pool)
            for c in tqdm(chosen, desc="specialists", unit="class", disable=not progress)
        ]
