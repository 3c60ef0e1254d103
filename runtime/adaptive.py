"""budget=auto over one request: which modules run next, on which inputs, and when an input is done.

Pure logic, no execution: the engine drives it with its runner, a gateway with its shards.

    stages = Stages(order, manifest.confidence, rule.thresholds, head.temperatures, n, k)
    while (step := stages.next()) is not None:
        chunk, rows = step                       # module ids, and the inputs still undecided
        stages.record(run(chunk, x[rows], squares=stages.squares))  # their sum, used, failed, unfinished, members
    mean, per_input = stages.answer()

After each stage (a prefix of the plan's order: 1, 2, 4, ..., 32, 48, 64, 96, ... modules), the inputs whose
exit signal (the bundle's: `confidence.exit_signal`) reaches the stage's threshold leave; the last stage lets
all leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from quorum.runtime.confidence import DEFAULT_TOLERANCE, PESSIMISTIC, MemberSums, exit_signal
from quorum.runtime.errors import InvalidRequest
from quorum.runtime.manifest import AdaptiveRule, ConfidenceEntry, Manifest
from quorum.runtime.results import FailedModule

__all__ = ["StageResult", "Stages", "adaptive_rule"]


def adaptive_rule(manifest: Manifest, tolerance: float | None) -> AdaptiveRule:
    """The exit thresholds for `tolerance` (default DEFAULT_TOLERANCE): those of the largest
    tolerance fitted within it (the smallest fitted, if none is)."""
    conf = manifest.confidence
    if conf is None:
        raise InvalidRequest(
            f"bundle {manifest.name!r} has no adaptive thresholds; fit them with "
            "`quorum calibration BUNDLE --write` (or re-export it), or give a budget"
        )
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    fitting = [r for r in conf.rules if r.tolerance <= tolerance + 1e-12]
    return fitting[-1] if fitting else conf.rules[0]


@dataclass
class StageResult:
    """What a stage's modules gave on the rows they ran on."""

    sum: np.ndarray  # (rows, K) float32: the sum of the used modules' outputs
    used: list[int]
    failed: list[FailedModule] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)  # cut off by the deadline
    members: MemberSums | None = None  # the used modules' sums for the disagreement


class Stages:
    """The stages of one request's order, and what each input has gathered so far."""

    def __init__(
        self,
        order: Sequence[int],
        fitted: ConfidenceEntry,
        thresholds: Sequence[float],
        temperatures: np.ndarray,
        n: int,
        k: int,
    ):
        """`order`: the plan's modules; `fitted`: the bundle's confidence entry (its prefix lengths, those
        beyond the order cut to it, and its exit signal); `thresholds`: one per fitted stage but the last;
        `temperatures`: by module count."""
        self.order = list(order)
        self._ends = [s for s in fitted.stages if s < len(self.order)] + [len(self.order)]
        self._signal = fitted.signal
        self.squares = fitted.signal == PESSIMISTIC  # whether the stages' members must bring their products
        self._whole = fitted.stages[-1]  # the order the thresholds were fitted for, all M modules
        self._thresholds = list(thresholds)
        self._temperatures = temperatures
        self.total = np.zeros((n, k), np.float32)
        self.counts = np.zeros(n, np.int64)
        self.members: MemberSums | None = MemberSums.zeros(n, k, squares=self.squares)
        self.rows = np.arange(n)
        self.used: list[int] = []
        self.failed: list[FailedModule] = []
        self.unfinished: list[int] = []
        self._stage = 0
        self._done = 0  # modules of the order handed out
        self._over = False

    def next(self) -> tuple[list[int], np.ndarray] | None:
        """The next stage's modules and the inputs (row indices) they run on; None when done."""
        if self._over or self._stage >= len(self._ends):
            return None
        end = self._ends[self._stage]
        chunk, self._done = self.order[self._done : end], end
        return chunk, self.rows

    def record(self, result: StageResult) -> None:
        """The stage handed out last answered `result` for its rows."""
        rows = self.rows
        self.failed += result.failed
        self.unfinished += result.unfinished
        if result.used:
            self.used += result.used
            self.total[rows] += result.sum
            self.counts[rows] += len(result.used)
            if self.members is not None and result.members is not None:
                self.members.add(result.members, rows)
            else:
                self.members = None
        stage, self._stage = self._stage, self._stage + 1
        if result.unfinished:  # the deadline cut this stage short: no later stage starts
            self.stop()
            return
        if stage == len(self._ends) - 1 or not self.used:
            return
        counts = self.counts[rows]
        z = self.total[rows] / np.maximum(counts, 1)[:, None]
        products = None if self.members is None else self.members.squares
        squares = None if products is None else products[rows]
        signal = exit_signal(self._signal, z, counts, self._temperatures[counts], squares, self._whole)
        self.rows = rows[signal < self._thresholds[stage]]
        self._over = not len(self.rows)

    def stop(self) -> None:
        """Start no more stages (the deadline has passed): the modules not handed out are unfinished."""
        if not self._over:
            self.unfinished += self.order[self._done :]
            self._over = True

    def answer(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean outputs (N, K) of the modules each input used, and their number per input (N,)."""
        mean: np.ndarray = self.total / np.maximum(self.counts, 1)[:, None]
        return mean, self.counts
