"""Planning a request: which modules run, given the budget, injected drops and module health.

Pure logic over module ids, no ONNX Runtime: easy to test, and the one place that defines
what `budget` and `drop` mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quorum.runtime.errors import InvalidRequest, NoModulesAvailable

__all__ = ["Plan", "drop_count", "make_plan"]


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
        raise NoModulesAvailable("no module is available: every module is quarantined")
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
