"""Execution: run the planned modules and combine their logits, on the packed or the isolated path.

The packed graph answers any subset in one call (in growing chunks under a deadline). When
the bundle has none, when its answer is unusable (it raises, or gives non-finite or
misshapen logits), or when faults are injected, the modules run one session each, so that
every failure has a module and a reason. Each outcome is counted, and failures go to the
module's breaker; a success closes a half-open one.
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import numpy as np

from quorum.runtime.breaker import Breakers
from quorum.runtime.confidence import MemberSums
from quorum.runtime.errors import InvalidRequest
from quorum.runtime.executors import IsolatedExecutor, ModuleRun
from quorum.runtime.faults import FaultPlan
from quorum.runtime.packed import PackedExecutor
from quorum.runtime.results import FailedModule
from quorum.runtime.stats import ModuleStats

__all__ = ["Combined", "Runner"]

log = logging.getLogger(__name__)


def _finite(a: np.ndarray) -> bool:
    """All values are finite: one sum, since a non-finite value makes it non-finite (a finite sum
    that overflows float32 only sends a sound answer down the isolated path, which checks each
    module). A few values are summed in Python floats, where a numpy reduction costs more."""
    return math.isfinite(sum(a.ravel().tolist()) if a.size <= _SMALL else a.sum())


_SMALL = 64


class Combined(NamedTuple):
    """The mean logits (N, K) of the modules that answered, and what happened to the others."""

    mean: np.ndarray
    used: list[int]
    failed: list[FailedModule]
    unfinished: list[int]  # cut off by the request's deadline (not failures)
    members: MemberSums | None = None  # what the uncertainty needs of the used modules (None: not known)


class Runner:
    """Runs modules of one bundle on its executors; counts every outcome."""

    def __init__(
        self,
        packed: PackedExecutor | None,
        isolated: IsolatedExecutor,
        stats: ModuleStats,
        breakers: Breakers,
        num_outputs: int,
        *,
        wait_for_first: bool = False,
        members: bool = True,
    ):
        self.packed = packed
        self.isolated = isolated
        self._stats = stats
        self._breakers = breakers
        self._width = num_outputs
        self.wait_for_first = wait_for_first  # under a deadline, wait for the first module past it
        self.members = members  # sum what the disagreement needs of the modules used

    def combine(
        self,
        ids: list[int],
        x: np.ndarray,
        *,
        index: np.ndarray | None = None,
        key: bytes | None = None,
        cacheable: bool = False,
        deadline_s: float | None = None,
        faults: FaultPlan | None = None,
        squares: bool = False,
    ) -> Combined:
        """Mean logits of the modules of `ids` that answer on features x (`index`: the ids as int64,
        `key`: their bytes, where the caller keeps them); with `squares`, the members' sums include
        their products (budget=auto's exit signal)."""
        if self.packed is not None and faults is None:
            if deadline_s is None:
                answer = self._run_packed(ids, x, cacheable, index, key, squares)
                if answer is not None:
                    return Combined(answer[0], ids, [], [], answer[1])
            elif (anytime := self._run_packed_anytime(ids, x, cacheable, deadline_s, squares)) is not None:
                mean, done, members = anytime
                return Combined(mean, ids[:done], [], ids[done:], members)
        runs = self.isolated.run(ids, x, deadline_s=deadline_s, wait_first=self.wait_for_first, faults=faults)
        unfinished = [r.id for r in runs if r.kind == "deadline"]
        runs = self._checked([r for r in runs if r.kind != "deadline"], x.shape[0])
        used = [r.id for r in runs if r.error is None]
        failed = [
            FailedModule(r.id, r.error, r.kind or "error", r.injected)  # type: ignore[arg-type]
            for r in runs
            if r.error is not None
        ]
        answers = [r.logits for r in runs if r.error is None and r.logits is not None]
        if not answers:
            return Combined(np.empty((x.shape[0], 0), np.float32), used, failed, unfinished)
        stacked = np.stack(answers)  # (b, N, K)
        sums = MemberSums.of(stacked, squares=squares) if self.members else None
        return Combined(np.mean(stacked, axis=0), used, failed, unfinished, sums)

    def _run_packed(
        self,
        ids: list[int],
        x: np.ndarray,
        cacheable: bool = False,
        index: np.ndarray | None = None,
        key: bytes | None = None,
        squares: bool = False,
    ) -> tuple[np.ndarray, MemberSums | None] | None:
        """Mean logits of `ids` from the packed graph and the members' sums (None where the graph
        cannot give them), or None when its answer is not usable."""
        assert self.packed is not None
        if index is None:
            index = np.array(ids, dtype=np.int64)
        try:
            if self.members:
                mean, members = self.packed.run_members(index, x, cacheable=cacheable, key=key)
            else:
                mean, members = self.packed.run(index, x, cacheable=cacheable, key=key), None
            ok = mean.shape == (x.shape[0], self._width) and _finite(mean)
        except Exception as e:
            log.warning("packed graph failed (%s: %s); running the modules one by one", type(e).__name__, e)
            return None
        self._stats.packed_call(index)
        if ok and self._breakers.any_half_open:
            self._breakers.succeeded(ids)
        if not ok:
            return None
        return mean, None if members is None else MemberSums.of(members, classes_first=True, squares=squares)

    def _run_packed_anytime(
        self, ids: list[int], x: np.ndarray, cacheable: bool, deadline_s: float, squares: bool = False
    ) -> tuple[np.ndarray, int, MemberSums | None] | None:
        """Anytime prediction on the packed path: the plan's modules in chunks of 1, 1, 2, 4, …
        (each one packed call), until the next chunk, timed by the last, would pass the deadline.

        Returns the mean logits of the first `done` modules, `done` and their members' sums, or None
        when the packed graph's answer is unusable. `done` is 0 when not even the first module finished in time
        (and the runner does not wait for the first).
        """
        t0 = time.perf_counter()
        total, done, size, per_module = None, 0, 1, 0.0
        sums: MemberSums | None = None
        while done < len(ids):
            chunk = ids[done : done + size]
            if done and time.perf_counter() - t0 + per_module * len(chunk) > deadline_s:
                break
            start = time.perf_counter()
            answer = self._run_packed(chunk, x, cacheable, squares=squares)
            if answer is None:
                return None
            mean, members = answer
            now = time.perf_counter()
            if not done and now - t0 > deadline_s and not self.wait_for_first:
                return np.empty((x.shape[0], 0), np.float32), 0, None
            per_module = (now - start) / len(chunk)
            total = mean * len(chunk) if total is None else total + mean * len(chunk)
            sums = members if not done else None if sums is None or members is None else sums.plus(members)
            done += len(chunk)
            size = done  # chunks double the modules done so far
        assert total is not None
        return total / done, done, sums

    def _checked(self, runs: list[ModuleRun], n: int) -> list[ModuleRun]:
        """Turn a wrong shape or non-finite logits into an error, count every run, and tell the
        breakers of the failures that are the module's fault (`_module_at_fault`).

        Inputs the server accepted that make every module that ran overflow are the client's: an
        InvalidRequest, and no module is blamed."""
        shape = (n, self._width)
        for r in runs:
            if r.error is None and r.logits is not None and r.logits.shape != shape:
                r.error, r.kind = f"output shape {r.logits.shape}, expected {shape}", "error"
        answered = [(r, r.logits) for r in runs if r.error is None and r.logits is not None]
        if answered:  # one vectorized check for the common case, where all are finite
            finite: list[bool] = np.isfinite(np.stack([a for _, a in answered])).all(axis=(1, 2)).tolist()
            for (r, _), ok in zip(answered, finite, strict=True):
                if not ok:
                    r.error, r.kind = "non-finite output", "nonfinite"
        real = [r for r in runs if not r.injected]
        if real and all(r.kind == "nonfinite" for r in real):
            raise InvalidRequest(
                "the inputs make every module's output overflow to non-finite values: they lie far outside the "
                "data the bundle was trained on"
            )
        self._stats.record(runs)
        slowest = max((r.ms for r in real if r.error is None), default=None)
        for r in runs:
            if r.error is None:
                continue
            if self._module_at_fault(r, slowest):
                log.warning("module %d failed: %s", r.id, r.error)
                self._breakers.failed(r.id)
            else:  # injected (a rehearsal's thousands) or not the module's doing: no breaker, no alarm
                log.debug("module %d failed, not at its own fault: %s", r.id, r.error)
        if self._breakers.any_half_open:
            self._breakers.succeeded(r.id for r in runs if r.error is None)
        return runs

    def _module_at_fault(self, run: ModuleRun, slowest_ok_ms: float | None) -> bool:
        """Whether a failed run counts against its module's breaker.

        Injected faults never do. A timeout does only when modules of the same request answered
        its inputs in under half the timeout: then the module is the slow one, not the request's
        size or a busy machine. An error or a non-finite output on inputs the server accepted does.
        """
        if run.injected:
            return False
        if run.kind == "timeout":
            return slowest_ok_ms is not None and slowest_ok_ms < self.isolated.timeout_s * 1e3 / 2
        return True
