"""Per-module health and counters: what `GET /modules` and the metrics read.

The request path adds to them in two ways: one vectorized increment per packed call (the
modules it combined), and one record per module run on the isolated path (time, outcome,
failure kind). A snapshot merges both with the breakers' states.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from quorum.runtime.breaker import Breakers, BreakerState

if TYPE_CHECKING:
    from quorum.runtime.executors import ModuleRun

__all__ = ["ModuleState", "ModuleStats"]

_FOLD_EVERY = 1024  # pending packed calls folded into the counters at once


ModuleStatus = Literal["healthy", "quarantined", "elsewhere", "unreachable"]


@dataclass
class ModuleState:
    """Health and counters of one module."""

    id: int
    file: str
    # elsewhere: another shard serves it; unreachable: (a gateway's view) no shard that serves it answers
    status: ModuleStatus
    reason: str | None = None  # why it is quarantined, or where it is
    calls: int = 0  # answers it was asked to take part in, on either path
    failures: int = 0  # runs that raised, timed out or returned non-finite values
    failure_kinds: dict[str, int] = field(default_factory=dict)  # failures by kind, or "injected"
    last_error: str | None = None
    total_ms: float = 0.0  # time spent in its runs of its own session (the packed path times whole calls)
    timed_runs: int = 0  # runs of its own session
    breaker: BreakerState = "closed"  # open: out of rotation after repeated failures, until open_for_s passes
    open_for_s: float | None = None
    breaker_trips: int = 0
    shard: str | None = None  # a gateway's view: the shard that serves it

    @property
    def mean_ms(self) -> float | None:
        """Mean time of a run of its own session; None if it has run only inside packed calls."""
        return round(self.total_ms / self.timed_runs, 4) if self.timed_runs else None


class ModuleStats:
    """Thread-safe counters of every module of a bundle, by id."""

    def __init__(self, states: list[ModuleState]):
        self._states = states
        self._packed_calls = np.zeros(len(states), np.int64)  # calls on the packed path, by id
        # Packed calls not yet counted into _packed_calls: appending is atomic and costs the request
        # path nothing; they are folded in batches, and before every snapshot.
        self._pending: deque[np.ndarray] = deque()
        self._lock = threading.Lock()

    def packed_call(self, index: np.ndarray) -> None:
        """The modules of `index` (int64 ids) answered one packed call."""
        self._pending.append(index)
        if len(self._pending) >= _FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            batch = []
            while True:
                try:
                    batch.append(self._pending.popleft())
                except IndexError:
                    break
            if batch:
                self._packed_calls += np.bincount(np.concatenate(batch), minlength=len(self._states))

    def record(self, runs: Iterable[ModuleRun]) -> None:
        """Count runs of the modules' own sessions: their time, and failures by kind ("injected" apart)."""
        with self._lock:
            for r in runs:
                state = self._states[r.id]
                state.calls += 1
                state.total_ms += r.ms
                state.timed_runs += 1
                if r.error is not None:
                    state.failures += 1
                    state.last_error = r.error
                    kind = "injected" if r.injected else r.kind or "error"
                    state.failure_kinds[kind] = state.failure_kinds.get(kind, 0) + 1

    def snapshot_one(self, j: int, breakers: Breakers) -> ModuleState:
        """Module j's state, with its breaker (its counters as of the last fold)."""
        breaker, _ = breakers.state(j)
        return replace(self._states[j], breaker=breaker)

    def snapshot(self, breakers: Breakers) -> list[ModuleState]:
        """Every module's state and counters, with its breaker, by id."""
        self._fold()
        now = time.monotonic()
        states = []
        for m in self._states:
            breaker, until = breakers.state(m.id)
            states.append((m, breaker, None if until is None else round(max(0.0, until - now), 3)))
        with self._lock:
            return [
                replace(
                    m,
                    calls=m.calls + int(self._packed_calls[m.id]),
                    failure_kinds=dict(m.failure_kinds),
                    breaker=breaker,
                    open_for_s=open_for,
                    breaker_trips=breakers.trips(m.id),
                )
                for m, breaker, open_for in states
            ]
