"""The data plane: what `/predict` and `/v2/models/{name}/infer` share.

Each protocol decodes its body into raw inputs and hands its options over as a mapping, query
strings or JSON scalars alike; `predict_options` turns them into one `PredictOptions` by one set
of rules, and `DataPlane.infer` runs the engine and observes the answer. Only the codecs
(`rest_codec`, `kserve_codec`) know a protocol's syntax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from quorum.runtime.faults import FaultPlan
from quorum.runtime.options import MAX_SEED, PredictOptions
from quorum.runtime.results import Partial, Prediction
from quorum.server.auth import may_inject_faults
from quorum.server.errors import ApiError
from quorum.server.gateway import Gateway
from quorum.server.metrics import Metrics
from quorum.server.reload import Leases

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["OPTIONS", "DataPlane", "predict_options"]

# Every option a request may carry, in either protocol; fail, nan and delay_ms inject faults.
OPTIONS = frozenset(
    {"budget", "deadline_ms", "delay_ms", "drop", "fail", "max_budget", "nan", "seed", "specialist", "tolerance"}
)
_MAX_DIGITS = 19  # an integer option longer than this is out of every range anyway
_MAX_IDS = 4096  # module ids one fault option may name


def predict_options(raw: Mapping[str, Any], request: Request, *, kind: str = "query") -> PredictOptions:
    """The options of a request from its query (`kind="query"`: every value a string) or its v2
    `parameters` (`kind="parameter"`: JSON scalars of the types the protocol's schema gives). A
    value of the wrong kind is a 422 naming it; fault injection needs the admin token or
    QUORUM_ALLOW_FAULT_INJECTION."""
    if unknown := sorted(str(k) for k in raw if k not in OPTIONS):
        shown = ", ".join(k if len(k) <= 40 else k[:40] + "…" for k in unknown[:5])
        raise ApiError(422, f"unknown {kind}(s) {shown}; known: {', '.join(sorted(OPTIONS))}")
    text = kind != "parameter"  # query parameters: numbers arrive as text
    seed = _integer(raw.get("seed"), "seed", kind, text)
    fail, nan = _ids(raw.get("fail"), "fail", kind), _ids(raw.get("nan"), "nan", kind)
    delay_ms = _number(raw.get("delay_ms"), "delay_ms", kind, text)
    faults = None
    if fail or nan or delay_ms:
        if not may_inject_faults(request):
            raise ApiError(
                403, "fault injection (fail, nan, delay_ms) needs the admin token, or QUORUM_ALLOW_FAULT_INJECTION=true"
            )
        faults = FaultPlan(fail=fail, nan=nan, delay_ms=delay_ms or 0.0, seed=seed)
    specialist = raw.get("specialist")
    if specialist is not None and (isinstance(specialist, bool) or not isinstance(specialist, int | str)):
        raise ApiError(422, f"{kind} specialist={specialist!r} must be a class index or name")
    budget = raw.get("budget")
    adaptive = isinstance(budget, str) and budget.strip().lower() == "auto"
    return PredictOptions(
        budget=None if adaptive else _integer(budget, "budget", kind, text),
        adaptive=adaptive,
        tolerance=_number(raw.get("tolerance"), "tolerance", kind, text),
        max_budget=_integer(raw.get("max_budget"), "max_budget", kind, text),
        drop=_drop(raw.get("drop"), kind, text),
        seed=seed,
        deadline_ms=_number(raw.get("deadline_ms"), "deadline_ms", kind, text),
        specialist=specialist,
        faults=faults,
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _integer(value: Any, name: str, kind: str, text: bool) -> int | None:
    """An int, or (`text`) a string of ASCII digits with an optional sign."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        stripped = value.strip()
        digits = stripped[1:] if stripped[:1] in "+-" else stripped
        if digits.isascii() and digits.isdigit() and len(digits) <= _MAX_DIGITS:
            return int(stripped)
    auto = ' or "auto"' if name == "budget" else ""
    raise ApiError(422, f"{kind} {name}={_shown(value)} is not an integer{auto}")


def _number(value: Any, name: str, kind: str, text: bool) -> float | None:
    """A finite int or float, or (`text`) a string of one."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif text and isinstance(value, str) and value.isascii() and len(value) <= 64:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ApiError(422, f"{kind} {name}={_shown(value)} is not a finite number")
    return number


def _drop(value: Any, kind: str, text: bool) -> int | float | None:
    """`drop=3` is a count of modules, `drop=0.25` a fraction."""
    if value is None:
        return None
    if text and isinstance(value, str):
        try:
            return _integer(value, "drop", kind, text)
        except ApiError:
            pass
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return _number(value, "drop", kind, text)
    except ApiError:
        raise ApiError(
            422, f"{kind} drop={_shown(value)} is not a number; give a fraction in [0, 1) or a count"
        ) from None


def _ids(value: Any, name: str, kind: str) -> frozenset[int]:
    """Module ids: an int, or comma-separated ids in a string."""
    if value is None or value == "":
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset({value})
    if isinstance(value, str):
        parts = value.split(",")
        if len(parts) <= _MAX_IDS and all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
            return frozenset(int(p) for p in parts)
    raise ApiError(422, f"{kind} {name}={_shown(value)} must be comma-separated module ids, e.g. {name}=3,17")


class DataPlane:
    """Runs requests of either protocol on the engine and counts their answers; each request
    holds its engine (`Leases`) until it ends, so a reload closes the old one only then."""

    def __init__(self, metrics: Metrics, leases: Leases):
        self._metrics = metrics
        self._leases = leases

    async def infer(self, engine: Engine, inputs: Any, options: PredictOptions) -> Prediction:
        with self._leases.hold(engine):
            if isinstance(engine, Gateway):  # asks its shards, concurrently, without blocking the loop
                result = await engine.predict_async(inputs, options)
            elif engine.may_wait(options.faults):  # isolated path or faults: waits on module deadlines
                result = await run_in_threadpool(engine.predict, inputs, options)
            else:
                # One bounded packed call (~0.05-3 ms): answered on the event loop, which saves a
                # thread hand-off that costs as much as the work (docs/RESULTS.md, HTTP).
                result = engine.predict(inputs, options)
        self._metrics.observe_answer(result)
        return result

    async def partial(
        self, engine: Engine, inputs: Any, ids: list[int], deadline_ms: float | None, squares: bool = False
    ) -> Partial:
        """A shard's share of a gateway's answer: the sum of the outputs of modules `ids` (with `squares`, the
        members' products too)."""
        answer = functools.partial(engine.partial, inputs, ids, deadline_ms=deadline_ms, squares=squares)
        with self._leases.hold(engine):
            if engine.may_wait():
                return await run_in_threadpool(answer)
            return answer()


# The seed's range, for the OpenAPI documentation of both protocols.
SEED_SCHEMA: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_SEED}
