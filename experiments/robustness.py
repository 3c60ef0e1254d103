"""Robustness to module removal (Webb et al., Fig. 4), the anytime order against random subsets,
and a CI gate on both.

    report = evaluate(Engine.load("bundles/lam099"), x_raw, labels, RobustnessConfig(trials=20),
                      [Requirement.parse("drop=0.5:acc>=0.85")])

Every healthy module's logits on the split are computed once through ONNX Runtime; every
sub-ensemble after that is numpy arithmetic: a subset S predicts the argmax of the mean of its
members' logits, the bundle's combiner. No torch here: a device's CI runs this without it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm import tqdm

from quorum.core.tasks import get_task
from quorum.runtime.engine import Engine
from quorum.runtime.errors import BundleError, InvalidRequest
from quorum.runtime.plan import drop_count

__all__ = [
    "MARGIN_Z",
    "REQUIRE_SYNTAX",
    "BundleReport",
    "Check",
    "Point",
    "Requirement",
    "RobustnessConfig",
    "SubsetScorer",
    "bundle_module_logits",
    "evaluate",
    "paired_margin",
    "removal_grid",
]

REQUIRE_SYNTAX = (
    'drop=D:METRIC OP VALUE, e.g. "drop=0.5:acc>=0.85" or "drop=200:min_acc>0.7"; D is a fraction in [0, 1) '
    "or a whole count of modules removed at random, METRIC is acc (mean over trials) or min_acc (worst trial), "
    "OP is one of >= > <= <, VALUE is an accuracy in [0, 1]"
)
_SPEC = re.compile(r"drop=(?P<drop>[^:]+):(?P<metric>min_acc|acc)(?P<op>>=|<=|>|<)(?P<value>.+)")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
MARGIN_Z = 1.96  # two-sided 95 % normal interval of the ordered prefix's margin over the random mean
_CHUNK = 16  # modules per Engine.module_logits call: one progress step, one preprocessing of the images


@dataclass(frozen=True)
class RobustnessConfig:
    trials: int = 20  # random subsets per number of removed modules (the paper: 20)
    step: int | None = None  # modules removed between grid points; None: M/20 rounded, at least 1
    seed: int = 0  # seeds the random subsets; a point's subsets depend only on (seed, modules removed)
    split: Literal["test", "train"] = "test"  # Fashion-MNIST split evaluated on
    limit: int | None = None  # only the first `limit` images of the split (quick looks, tests)
    device: str = "auto"  # ONNX Runtime device that computes the module logits

    def __post_init__(self) -> None:
        for name, value, low in (("trials", self.trials, 1), ("step", self.step, 1), ("seed", self.seed, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InvalidRequest(f"--{name} must be an integer >= {low}, got {value!r}")
        if self.split not in ("test", "train"):
            raise InvalidRequest(f"--split must be test or train, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise InvalidRequest(f"--limit must be at least 1 image, got {self.limit}")


@dataclass(frozen=True)
class Requirement:
    """One CI gate, e.g. `drop=0.5:acc>=0.85`: with half the modules removed at random, mean accuracy >= 0.85."""

    text: str  # the spec as given
    drop: float | int  # fraction in [0, 1) or count of modules removed, as the server's `drop`
    metric: Literal["acc", "min_acc"]  # mean accuracy over the trials, or that of the worst trial
    op: str  # one of >= > <= <
    threshold: float  # accuracy in [0, 1]

    @classmethod
    def parse(cls, text: str) -> Requirement:
        """Parse a spec; InvalidRequest shows the expected syntax."""
        match = _SPEC.fullmatch(text.replace(" ", ""))
        if match is None:
            raise InvalidRequest(f"malformed requirement {text!r}; expected {REQUIRE_SYNTAX}")
        drop_text, value_text = match["drop"], match["value"]
        drop: float | int
        try:
            drop = int(drop_text)
        except ValueError:
            try:
                drop = float(drop_text)
            except ValueError:
                raise InvalidRequest(
                    f"requirement {text!r}: drop={drop_text!r} is not a number; expected {REQUIRE_SYNTAX}"
                ) from None
        if (isinstance(drop, int) and drop < 0) or (isinstance(drop, float) and not 0 <= drop < 1):
            raise InvalidRequest(
                f"requirement {text!r}: drop must be a fraction in [0, 1) or a count >= 0 of modules removed "
                f"(e.g. drop=0.9 or drop=230), got {drop_text}"
            )
        try:
            threshold = float(value_text)
        except ValueError:
            raise InvalidRequest(
                f"requirement {text!r}: {value_text!r} is not a number; expected {REQUIRE_SYNTAX}"
            ) from None
        if not 0 <= threshold <= 1:
            raise InvalidRequest(f"requirement {text!r}: accuracies are fractions in [0, 1] (0.85, not 85)")
        metric: Literal["acc", "min_acc"] = "acc" if match["metric"] == "acc" else "min_acc"
        return cls(text=text, drop=drop, metric=metric, op=match["op"], threshold=threshold)

    def removed(self, num_modules: int) -> int:
        """Modules removed at random from `num_modules` (the server's `drop` rounding: fractions round down)."""
        try:
            return drop_count(self.drop, num_modules)
        except InvalidRequest as e:
            raise InvalidRequest(f"requirement {self.text!r}: {e}") from None

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class Point:
    """Accuracy with `removed` modules removed at random, and the anytime prefix of the same size."""

    removed: int  # modules removed at random
    modules: int  # modules left (M - removed): the budget b of the anytime comparison
    mean: float  # accuracy, mean over the random trials
    std: float  # population standard deviation over the trials
    min: float  # worst trial
    max: float  # best trial
    ordered: float  # accuracy of the first `modules` healthy modules of the anytime order
    beats: float  # fraction of the random subsets that the ordered prefix beats (strictly)
    margin_se: float  # standard error of ordered - mean over the images, paired by image (paired_margin)

    @property
    def resolvably_worse(self) -> bool:
        """The ordered prefix is below the random mean by more than the 95 % interval of the margin."""
        return self.ordered - self.mean + MARGIN_Z * self.margin_se < 0


@dataclass(frozen=True)
class Check:
    requirement: str  # the spec as given
    removed: int  # modules removed at the point it was measured at
    metric: str  # acc | min_acc
    measured: float
    passed: bool


@dataclass
class BundleReport:
    name: str  # manifest name
    path: str  # bundle directory as given
    lam: float  # λ the ensemble was trained with (manifest.training)
    arch: str
    num_modules: int  # modules in the bundle
    modules: int  # M: healthy modules, the ones evaluated
    quarantined: list[int]  # ids left out because they failed verification at load
    full_accuracy: float  # all M modules combined
    step: int  # modules removed between grid points
    curve: list[Point]  # the grid: removed = 0, step, 2*step, ..., M - 1
    summary: list[Point]  # removed = 0, 50 %, 90 %, M - 1 (the printed table)
    ordered_beats_random: bool  # the anytime prefix beats the random mean at every budget < M
    ordered_worse_at: list[int]  # budgets of the grid where it is resolvably worse (Point.resolvably_worse)
    checks: list[Check] = field(default_factory=list)


def removal_grid(num_modules: int, step: int | None = None) -> list[int]:
    """Numbers of removed modules: 0, s, 2s, ... below M, and M - 1 (one module left); s = M/20 rounded."""
    s = step if step is not None else max(1, round(num_modules / 20))
    grid = list(range(0, num_modules, s))
    return grid if grid[-1] == num_modules - 1 else [*grid, num_modules - 1]


class SubsetScorer:
    """Accuracy of any sub-ensemble, from every module's logits computed once."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray):
        """
        Args:
            logits: (N, M, K) every module's logits on N images. A transposed view of a module-major
                (M, N, K) array is used without a copy.
            labels: (N,) true classes.
        """
        n, m, k = logits.shape
        assert labels.shape == (n,), "one label per image"
        self.num_modules = m
        self._shape = (n, k)
        # (M, N*K): a batch of subset weights (T, M) combines by one matmul
        self._by_module = np.ascontiguousarray(logits.transpose(1, 0, 2), dtype=np.float32).reshape(m, n * k)
        self._labels = np.asarray(labels)

    def correct(self, subsets: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """(T, N): whether each subset of module columns classifies each image right, by the argmax of
        the mean of its members' logits."""
        weights = np.zeros((len(subsets), self.num_modules), np.float32)  # (T, M)
        for row, cols in zip(weights, subsets, strict=True):
            row[np.asarray(cols)] = 1.0 / len(cols)
        scores = weights @ self._by_module  # (T, N*K): mean logits of each subset
        labels = scores.reshape(len(subsets), *self._shape).argmax(axis=2)  # (T, N)
        out: np.ndarray = labels == self._labels
        return out

    def accuracy(self, subsets: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """Accuracy (T,) of each subset of module columns."""
        out: np.ndarray = self.correct(subsets).mean(axis=1)
        return out

    def random_subsets(self, removed: int, trials: int, seed: int) -> list[np.ndarray]:
        """`trials` random subsets of module columns with `removed` modules left out, seeded by (seed, removed)."""
        m = self.num_modules
        if not 0 <= removed < m:
            raise InvalidRequest(f"can remove 0..{m - 1} of {m} modules, not {removed}")
        if removed == 0:  # every trial is the whole ensemble
            return [np.arange(m)] * trials
        rng = np.random.default_rng([seed, removed])
        return list(np.argsort(rng.random((trials, m)), axis=1)[:, : m - removed])  # T of (M - removed,)

    def random_removal(self, removed: int, trials: int, seed: int) -> np.ndarray:
        """Accuracy (trials,) of random subsets with `removed` modules left out, seeded by (seed, removed)."""
        return self.accuracy(self.random_subsets(removed, trials, seed))


def paired_margin(ordered: np.ndarray, random: np.ndarray) -> tuple[float, float]:
    """Accuracy of one subset minus the mean accuracy of others on the same images, and its standard error.

    Args:
        ordered: (N,) whether the one subset (the anytime prefix) classifies each image right.
        random: (T, N) the same for each of T other subsets (random ones of the same size).

    The standard error treats the N images as a sample from the data the bundle will see: per image the
    difference d_i = ordered_i - mean_t random_ti, and SE = std(d, ddof=1) / sqrt(N). Pairing by image
    removes what the images share (most are right for every subset), so it resolves margins of a few
    images that unpaired intervals of two accuracies would not.
    """
    d = ordered.astype(np.float64) - random.mean(axis=0)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def bundle_module_logits(engine: Engine, x_raw: np.ndarray, ids: list[int], progress: bool) -> np.ndarray:
    """(N, M, K) logits of the modules `ids`, as a view of a module-major array (SubsetScorer's layout).

    `x_raw` are Fashion-MNIST images, flat or not: they are shaped as the bundle's modules take them."""
    m = engine.manifest
    if not get_task(m.task.kind).has_classes or m.training.dataset != "fashion-mnist":
        raise BundleError(
            f"bundle {m.name!r} is a {m.training.dataset} {m.task.kind} model; robustness curves and specialist "
            "comparisons are measured on Fashion-MNIST classifiers"
        )
    x_raw = x_raw.reshape(len(x_raw), *m.input.shape)
    by_module = np.empty((len(ids), len(x_raw), m.num_classes), np.float32)  # (M, N, K)
    name = m.name
    with tqdm(total=len(ids), unit="module", desc=f"{name}: module logits", disable=not progress) as bar:
        for c in range(0, len(ids), _CHUNK):
            chunk = ids[c : c + _CHUNK]
            by_module[c : c + len(chunk)] = engine.module_logits(x_raw, chunk).transpose(1, 0, 2)
            bar.update(len(chunk))
    return by_module.transpose(1, 0, 2)


def evaluate(
    engine: Engine,
    x_raw: np.ndarray,
    labels: np.ndarray,
    cfg: RobustnessConfig,
    requirements: Sequence[Requirement] = (),
    *,
    progress: bool = False,
) -> BundleReport:
    """Removal curve, anytime comparison, summary rows and requirement checks of one loaded bundle.

    Args:
        engine: the loaded bundle; its healthy modules are the M evaluated.
        x_raw: (N, *input.shape) raw inputs (0..255 pixels); the engine normalizes them.
        labels: (N,) true classes.
        cfg: trials, grid step and seed.
        requirements: gates to check; each is measured exactly at its own number of removed modules.
    """
    ids = sorted(engine.healthy_ids)
    m = len(ids)
    checks_at = [(req, req.removed(m)) for req in requirements]  # bad drops fail before the slow part
    grid = removal_grid(m, cfg.step)
    summary_at = sorted({0, drop_count(0.5, m), drop_count(0.9, m), m - 1})
    scorer = SubsetScorer(bundle_module_logits(engine, x_raw, ids, progress), labels)

    column = {j: c for c, j in enumerate(ids)}
    order = [column[j] for j in engine.manifest.anytime_order if j in column]  # healthy ids only
    wanted = sorted(set(grid) | set(summary_at) | {r for _, r in checks_at})
    ordered = dict(zip(wanted, scorer.correct([order[: m - r] for r in wanted]), strict=True))  # r -> (N,)
    trials: dict[int, np.ndarray] = {}
    points: dict[int, Point] = {}
    for r in tqdm(wanted, unit="point", desc=f"{engine.manifest.name}: random removal", disable=not progress):
        right = scorer.correct(scorer.random_subsets(r, cfg.trials, cfg.seed))  # (T, N)
        acc = trials[r] = right.mean(axis=1)
        o = float(ordered[r].mean())
        _, margin_se = paired_margin(ordered[r], right)
        points[r] = Point(
            removed=r,
            modules=m - r,
            mean=float(acc.mean()),
            std=float(acc.std()),
            min=float(acc.min()),
            max=float(acc.max()),
            ordered=o,
            beats=float((o > acc).mean()),
            margin_se=margin_se,
        )
    checks = []
    for req, r in checks_at:
        value = float(trials[r].mean() if req.metric == "acc" else trials[r].min())
        checks.append(Check(req.text, r, req.metric, value, req.holds(value)))
    training = engine.manifest.training
    return BundleReport(
        name=engine.manifest.name,
        path=str(engine.bundle_dir),
        lam=training.lam,
        arch=training.arch,
        num_modules=engine.num_modules,
        modules=m,
        quarantined=sorted(set(range(engine.num_modules)) - set(ids)),
        full_accuracy=points[0].mean,
        step=grid[1] if len(grid) > 1 else 1,
        curve=[points[r] for r in grid],
        summary=[points[r] for r in summary_at],
        ordered_beats_random=all(points[r].ordered > points[r].mean for r in grid if r > 0),
        ordered_worse_at=[points[r].modules for r in grid if r > 0 and points[r].resolvably_worse],
        checks=checks,
    )
