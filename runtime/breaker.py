"""Circuit breakers: a module that keeps failing is taken out of rotation for a while.

closed     in rotation; failures are remembered for `window_s`
open       `failures` failures within the window: out of rotation for `open_s`
half_open  the time is up: one request at a time may try the module (`claim`); a success
           closes the breaker, a failure opens it again; other requests go on without it

One `Breakers` holds every module's state; `version` changes whenever the set of modules in
rotation may have changed, so that callers can cache what they derive from it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BreakerState", "Breakers"]

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class _Breaker:
    state: BreakerState = "closed"
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    trips: int = 0  # times it opened
    trial: bool = False  # half-open, and a request is trying it now


class Breakers:
    """Thread-safe breakers for modules 0..M-1. `failures` <= 0 turns them off."""

    def __init__(self, num_modules: int, failures: int = 5, window_s: float = 30.0, open_s: float = 30.0):
        self.failures, self.window_s, self.open_s = failures, window_s, open_s
        self._b = [_Breaker() for _ in range(num_modules)]
        self._lock = threading.Lock()
        self._next_expiry = float("inf")  # earliest open_until of an open breaker
        self._half_open = 0
        self.version = 0

    def state(self, j: int) -> tuple[BreakerState, float | None]:
        """Module j's state, and until when (monotonic seconds) it stays open."""
        self.refresh()
        b = self._b[j]
        return b.state, (b.open_until if b.state == "open" else None)

    def closed_to_traffic(self) -> frozenset[int]:
        """Modules out of rotation now (open breakers)."""
        self.refresh()
        return frozenset(j for j, b in enumerate(self._b) if b.state == "open")

    def refresh(self, now: float | None = None) -> None:
        """Move open breakers whose time is up to half-open."""
        now = time.monotonic() if now is None else now
        if now < self._next_expiry:
            return
        with self._lock:
            for b in self._b:
                if b.state == "open" and now >= b.open_until:
                    b.state = "half_open"
                    self._half_open += 1
            self._next_expiry = min((b.open_until for b in self._b if b.state == "open"), default=float("inf"))
            self.version += 1

    def next_retry_s(self, now: float | None = None) -> float | None:
        """Seconds until the first open breaker lets its module be tried again; None if none is open."""
        now = time.monotonic() if now is None else now
        return None if self._next_expiry == float("inf") else max(0.0, self._next_expiry - now)

    def trials_running(self) -> frozenset[int]:
        """Half-open modules that a request is trying now: others must not use them."""
        return frozenset(j for j, b in enumerate(self._b) if b.trial)

    def claim(self, ids: Iterable[int]) -> tuple[list[int], list[int]]:
        """Claim the trial of each half-open module among `ids`.

        Returns `ids` without the half-open modules another request is trying, and the trials
        claimed, which the caller must `release` when its request ends.
        """
        keep, claimed = [], []
        with self._lock:
            for j in ids:
                b = self._b[j]
                if b.state == "half_open":
                    if b.trial:
                        continue
                    b.trial = True
                    claimed.append(j)
                keep.append(j)
        return keep, claimed

    def release(self, ids: Iterable[int]) -> None:
        """End trials that no success or failure ended (the request's deadline cut them off)."""
        with self._lock:
            for j in ids:
                self._b[j].trial = False

    def failed(self, j: int, now: float | None = None) -> None:
        if self.failures <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            b = self._b[j]
            b.failures.append(now)
            while b.failures and b.failures[0] < now - self.window_s:
                b.failures.popleft()
            if b.state == "half_open" or (b.state == "closed" and len(b.failures) >= self.failures):
                self._half_open -= b.state == "half_open"
                b.state, b.open_until, b.trips, b.trial = "open", now + self.open_s, b.trips + 1, False
                b.failures.clear()
                self._next_expiry = min(self._next_expiry, b.open_until)
                self.version += 1

    def succeeded(self, ids: Iterable[int]) -> None:
        """Close the half-open breakers among `ids` (their trial succeeded)."""
        with self._lock:
            for j in ids:
                if self._b[j].state == "half_open":
                    self._half_open -= 1
                    self._b[j].state, self._b[j].trial = "closed", False
                    self._b[j].failures.clear()
                    self.version += 1

    @property
    def any_half_open(self) -> bool:
        return self._half_open > 0

    def trips(self, j: int) -> int:
        return self._b[j].trips
