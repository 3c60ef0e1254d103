"""`PredictOptions`: everything a request may ask for besides its inputs, checked in one place.

Both HTTP protocols parse their own syntax into one of these; the engine takes nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quorum.runtime.errors import InvalidRequest
from quorum.runtime.faults import FaultPlan

__all__ = ["MAX_SEED", "PredictOptions"]

MAX_SEED = 2**63 - 1  # seeds are non-negative 64-bit integers (numpy's generators refuse negative ones)


@dataclass(slots=True)
class PredictOptions:
    """Checked on construction; treat as immutable (`dataclasses.replace` makes a changed copy).
    Not frozen: a frozen dataclass costs three times as much to build, on every request."""

    budget: int | None = None  # run the first `budget` available modules of the order (1..M; default all)
    drop: float | int | None = None  # fault injection: a count, or a fraction in [0, 1), of modules made unavailable
    seed: int | None = None  # seeds the random choice of dropped modules
    deadline_ms: float | None = None  # anytime prediction: the modules of the plan that finish within this time
    specialist: int | str | None = None  # answer "is it this class?" from that class's specialist subset
    faults: FaultPlan | None = None  # injected faults for this request, on top of the engine's own
    adaptive: bool = False  # budget=auto: per input, stop at the first stage of the order confident enough
    tolerance: float | None = None  # adaptive: accuracy the client gives up against the whole ensemble
    max_budget: int | None = None  # adaptive: modules an input may use at most (default all)

    def __post_init__(self) -> None:
        if self.budget is not None and type(self.budget) is not int:  # its range, 1..M, is the plan's to check
            raise InvalidRequest(f"budget={self.budget!r} must be a whole number of modules")
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequest(f"seed={self.seed!r} must be a whole number in 0..{MAX_SEED}")
        if self.drop is not None and (isinstance(self.drop, bool) or not isinstance(self.drop, int | float)):
            raise InvalidRequest(f"drop must be a fraction in [0, 1) or a whole count, got {self.drop!r}")
        deadline = self.deadline_ms
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline < math.inf
        ):
            raise InvalidRequest(f"deadline_ms={deadline!r} must be a positive number of milliseconds")
        if self.tolerance is not None and (
            isinstance(self.tolerance, bool)
            or not isinstance(self.tolerance, int | float)
            or not 0 <= self.tolerance <= 1
        ):
            raise InvalidRequest(f"tolerance={self.tolerance!r} must be an accuracy in [0, 1], e.g. 0.001")
        if self.max_budget is not None and (type(self.max_budget) is not int or self.max_budget < 1):
            raise InvalidRequest(f"max_budget={self.max_budget!r} must be a whole number of modules, at least 1")
        if not self.adaptive and (self.tolerance is not None or self.max_budget is not None):
            raise InvalidRequest("tolerance and max_budget go with budget=auto")
        if self.adaptive and self.budget is not None:
            raise InvalidRequest("budget=auto chooses the modules per input; give max_budget to cap them, not a budget")
        if self.adaptive and self.specialist is not None:
            raise InvalidRequest("specialist subsets have no adaptive stages: give a budget, not budget=auto")
        if self.specialist is not None and (
            isinstance(self.specialist, bool) or not isinstance(self.specialist, int | str)
        ):
            raise InvalidRequest(f"specialist must be a class index or name, got {self.specialist!r}")


DEFAULT = PredictOptions()
