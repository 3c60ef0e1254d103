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
        if self.specialist is not None and (
            isinstance(self.specialist, bool) or not isinstance(self.specialist, int | str)
        ):
            raise InvalidRequest(f"specialist must be a class index or name, got {self.specialist!r}")


DEFAULT = PredictOptions()
