"""Planning a request: which modules run, given the budget, injected drops and module health.

Pure logic over module ids, no ONNX Runtime: easy to test, and the one place that defines
what `budget` and `drop` mean (`make_plan`), and which modules are in rotation (`Planner`:
quarantined modules and open breakers are not, injected faults drop more, a half-open
module is tried by one request at a time).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from quorum.runtime.breaker import Breakers
from quorum.runtime.errors import InvalidRequest, NoModulesAvailable
from quorum.runtime.faults import FaultPlan

__all__ = ["Plan", "Planner", "RequestPlan", "drop_count", "make_plan"]


@dataclass(frozen=True)
class Plan:
    requested: int  # modules the request asked for: its budget, or every module of the bundle
    selected: list[int]  # module ids to run, in anytime order
    dropped: list[int]  # ids made unavailable by fault injection (`drop`), sorted


def drop_count(drop: float | int, available: int) -> int:
    """How many of `available` modules a `drop` removes.

    An int is a count (0 <= drop < available). A float is a fraction in [0, 1) of the
    available modules, rounded down, so that at least one module always remains.
    """
    if isinstance(drop, bool) or not isinstance(drop, int | float):
        raise InvalidRequest(f"drop must be a fraction in [0, 1) or an integer count, got {drop!r}")
    if isinstance(drop, int):
        if not 0 <= drop < available:
            raise InvalidRequest(
                f"drop={drop} must lie in 0..{available - 1}: there are {available} available modules "
                "and at least one must remain"
            )
        return drop
    if not math.isfinite(drop) or not 0 <= drop < 1:
        raise InvalidRequest(
            f"drop={drop} as a fraction must lie in [0, 1); give a whole number (e.g. drop=3) to drop a count"
        )
    return int(drop * available)


def make_plan(
    order: Sequence[int],
    healthy: set[int] | frozenset[int] | None,
    num_modules: int,
    *,
    budget: int | None = None,
    drop: float | int | None = None,
    seed: int | None = None,
) -> Plan:
    """Choose the modules for one request.

    Args:
        order: the module ids to choose from, best first: the bundle's anytime order, or a
            specialist subset in selection order.
        healthy: ids that are loaded and in rotation; None when `order` holds only those.
        num_modules: len(order), counting quarantined modules; bounds the budget.
        budget: run the first `budget` available modules of the order (default: all).
        drop: simulate failed hardware: make this many (int) or this fraction (float) of
            the available modules unavailable, chosen at random.
        seed: seeds the random choice of dropped modules.
    """
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise InvalidRequest(f"budget must be an integer, got {budget!r}")
        if not 1 <= budget <= num_modules:
            raise InvalidRequest(
                f"budget={budget} must lie in 1..{num_modules}: there are {num_modules} modules to choose from"
            )
    available = list(order) if healthy is None else [j for j in order if j in healthy]
    if not available:
        raise NoModulesAvailable(
            "no module is available: every module of the order is quarantined or out of rotation (its breaker open)"
        )
    dropped: list[int] = []
    if drop is not None:
        k = drop_count(drop, len(available))
        if k:
            rng = np.random.default_rng(seed)
            dropped = sorted(int(j) for j in rng.choice(available, size=k, replace=False))
            gone = set(dropped)
            available = [j for j in available if j not in gone]
    requested = budget if budget is not None else num_modules
    return Plan(requested=requested, selected=available[:requested], dropped=dropped)


@dataclass(frozen=True)
class RequestPlan:
    """What one request runs: `Plan`, plus what the breakers and the packed cache need."""

    requested: int
    selected: list[int]  # module ids to run, in order; shared by cached plans: never modify
    dropped: list[int]  # made unavailable by `drop` or by a fault plan, sorted
    trials: list[int] = field(default_factory=list)  # half-open modules claimed: release when the request ends
    cacheable: bool = False  # a prefix of a fixed order (no drops): its gathered weights are worth keeping

    @cached_property
    def index(self) -> np.ndarray:
        """`selected` as int64 ids, the packed graph's index input."""
        return np.array(self.selected, dtype=np.int64)

    @cached_property
    def key(self) -> bytes:
        """The bytes of `index`: the packed cache's key of this subset."""
        return self.index.tobytes()


class Planner:
    """Plans requests over the modules in rotation: the anytime order or a specialist subset, less
    quarantined modules and open breakers, less injected drops; half-open modules claimed for trial.

    The orders restricted to the rotation are recomputed only when the breakers' version changes,
    and the plan of a plain budget (no drop, no faults, no trial running) is kept per version, so
    that the common request plans in a dictionary lookup.
    """

    def __init__(
        self,
        anytime_order: Sequence[int],
        specialists: Sequence[Sequence[int]],
        healthy: frozenset[int],
        breakers: Breakers,
    ):
        self._anytime_all = list(anytime_order)
        self._specialists_all = [list(s) for s in specialists]
        self._healthy = healthy
        self._breakers = breakers
        self._lock = threading.Lock()
        self._version = -1
        self._anytime: list[int] = []
        self._specialists: list[list[int]] = []
        self._plans: dict[tuple[int | None, int | None], RequestPlan] = {}
        self._rotation()

    def _rotation(self) -> None:
        """Recompute the orders in rotation if the set of modules in rotation may have changed."""
        self._breakers.refresh()
        if self._breakers.version == self._version:
            return
        with self._lock:
            version = self._breakers.version
            out = self._breakers.closed_to_traffic()
            ok = frozenset(j for j in self._healthy if j not in out)
            self._anytime = [j for j in self._anytime_all if j in ok]
            self._specialists = [[j for j in s if j in ok] for s in self._specialists_all]
            self._plans = {}
            self._version = version

    def in_rotation(self) -> list[int]:
        """The anytime order without quarantined or open-breaker modules."""
        self._rotation()
        return self._anytime

    def plan(
        self,
        specialist: int | None,
        budget: int | None = None,
        drop: float | int | None = None,
        seed: int | None = None,
        faults: FaultPlan | None = None,
    ) -> RequestPlan:
        """The plan of one request on the anytime order (`specialist` None) or on class `specialist`'s subset."""
        self._rotation()
        plain = drop is None and faults is None and not self._breakers.any_half_open
        if plain and (cached := self._plans.get((specialist, budget))) is not None:
            return cached
        order = self._anytime if specialist is None else self._specialists[specialist]
        num = len(self._anytime_all) if specialist is None else len(self._specialists_all[specialist])
        if not order:
            raise self._nothing_in_rotation(specialist)
        available = order
        fault_drops: list[int] = []
        if faults is not None:
            faults.check_ids(len(self._anytime_all))
            if fault_drops := faults.dropped(available):
                gone = set(fault_drops)
                available = [j for j in available if j not in gone]
        trying = self._breakers.any_half_open
        if trying:  # a half-open module is tried by one request at a time
            busy = self._breakers.trials_running()
            available = [j for j in available if j not in busy]
        base = make_plan(available, None, num, budget=budget, drop=drop, seed=seed)
        selected, trials = self._breakers.claim(base.selected) if trying else (base.selected, [])
        dropped = sorted(base.dropped + fault_drops)
        plan = RequestPlan(base.requested, selected, dropped, trials, cacheable=not dropped)
        if plain:
            self._plans[(specialist, budget)] = plan
        return plan

    def _nothing_in_rotation(self, specialist: int | None) -> NoModulesAvailable:
        """Why the order has no module in rotation: quarantined at load, or breakers open (and until when)."""
        whose = "the bundle" if specialist is None else f"class {specialist}'s specialist subset"
        wanted = self._anytime_all if specialist is None else self._specialists_all[specialist]
        if not any(j in self._healthy for j in wanted):
            return NoModulesAvailable(f"no module of {whose} is available: every one is quarantined (see /modules)")
        retry = self._breakers.next_retry_s()
        when = f"; the first is tried again in {retry:.1f} s" if retry is not None else ""
        return NoModulesAvailable(
            f"no module of {whose} is available: the healthy ones are out of rotation after repeated failures "
            f"(their circuit breakers are open{when})",
            retry_after_s=retry,
        )

    def release(self, plan: RequestPlan) -> None:
        """End the trials the request claimed (those no success or failure ended)."""
        if plan.trials:
            self._breakers.release(plan.trials)
