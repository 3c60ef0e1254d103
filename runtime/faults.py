"""Fault injection for robustness rehearsals: make modules fail on purpose, through the real paths.

A `FaultPlan` says which modules raise, which return NaN, how long every module run is
delayed, and with which probabilities a module run raises, hangs, returns NaN, or the module
is dropped. The engine runs a request with faults on the isolated path, where an injected
exception, an injected delay or hang (against the module timeout and the deadline) and
injected NaN logits meet the same checks, the same timeout and the same circuit breakers as
real ones; the answer lists them apart from real failures.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from quorum.runtime.errors import InvalidRequest

__all__ = ["FaultPlan", "InjectedFault"]


class InjectedFault(RuntimeError):
    """Raised in place of a module's run by a fault plan."""


@dataclass(frozen=True)
class FaultPlan:
    fail: frozenset[int] = frozenset()  # these modules raise
    nan: frozenset[int] = frozenset()  # these modules return NaN logits
    delay_ms: float = 0.0  # every module run waits this long first
    fail_probability: float = 0.0  # any module raises with this probability
    nan_probability: float = 0.0  # any module returns NaN logits with this probability
    hang_probability: float = 0.0  # any module hangs (until the timeout or deadline) with this probability
    drop_probability: float = 0.0  # any module is made unavailable with this probability
    seed: int | None = None  # seeds the random choices (per request, for reproducible rehearsals)
    _rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("fail_probability", "nan_probability", "hang_probability", "drop_probability"):
            p = getattr(self, name)
            if not (isinstance(p, int | float) and 0 <= p < 1):
                raise InvalidRequest(f"{name}={p!r} must lie in [0, 1)")
        if not (isinstance(self.delay_ms, int | float) and 0 <= self.delay_ms < math.inf):
            raise InvalidRequest(f"delay_ms={self.delay_ms!r} must be a non-negative number of milliseconds")
        if self.seed is not None:
            self._rng.seed(self.seed)

    @classmethod
    def merge(cls, *plans: FaultPlan | None) -> FaultPlan | None:
        """One plan doing what each of `plans` does (None when there is nothing to do)."""
        given = [p for p in plans if p is not None and p.active]
        if not given:
            return None
        if len(given) == 1:
            return given[0]
        return cls(
            fail=frozenset().union(*(p.fail for p in given)),
            nan=frozenset().union(*(p.nan for p in given)),
            delay_ms=max(p.delay_ms for p in given),
            fail_probability=1 - math.prod(1 - p.fail_probability for p in given),
            nan_probability=1 - math.prod(1 - p.nan_probability for p in given),
            hang_probability=1 - math.prod(1 - p.hang_probability for p in given),
            drop_probability=1 - math.prod(1 - p.drop_probability for p in given),
            seed=next((p.seed for p in given if p.seed is not None), None),
        )

    @property
    def active(self) -> bool:
        return bool(
            self.fail
            or self.nan
            or self.delay_ms
            or self.fail_probability
            or self.nan_probability
            or self.hang_probability
            or self.drop_probability
        )

    def check_ids(self, num_modules: int) -> None:
        if bad := sorted(j for j in self.fail | self.nan if not 0 <= j < num_modules):
            raise InvalidRequest(f"fault plan names module(s) {bad}; ids run 0..{num_modules - 1}")

    def dropped(self, ids: Iterable[int]) -> list[int]:
        """The modules of `ids` this plan makes unavailable for one request."""
        if not self.drop_probability:
            return []
        return [j for j in ids if self._rng.random() < self.drop_probability]

    def before_run(self, j: int, cancel: threading.Event, waiting: set[int] | None = None) -> bool:
        """Called at the start of module j's run: wait, hang or raise. Waits end early when
        `cancel` is set (the run's timeout or deadline passed); while j waits on an injected
        delay or hang it is in `waiting`, and stays there if the wait is cut off, so that the
        timeout is reported as injected. True: corrupt its logits."""
        r = self._rng.random() if self.fail_probability or self.nan_probability or self.hang_probability else 1.0

        def wait(seconds: float | None) -> None:
            if waiting is not None:
                waiting.add(j)
            if not cancel.wait(seconds) and waiting is not None:
                waiting.discard(j)

        if self.delay_ms:
            wait(self.delay_ms / 1e3)
        if j in self.fail or r < self.fail_probability:
            raise InjectedFault(f"injected failure of module {j}")
        r -= self.fail_probability
        if r < self.hang_probability:
            wait(None)  # until the executor gives up on the run
            raise InjectedFault(f"injected hang of module {j}")
        r -= self.hang_probability
        return j in self.nan or r < self.nan_probability
