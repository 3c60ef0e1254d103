"""POST /predict: translate HTTP to `Engine.predict` and back. No computation here."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams

from quorum.runtime.engine import Engine, Prediction
from quorum.runtime.faults import FaultPlan
from quorum.server.body import OPENAPI_REQUEST_BODY, read_inputs
from quorum.server.deps import get_engine, get_settings
from quorum.server.errors import ApiError
from quorum.server.metrics import Metrics
from quorum.server.routes.admin import fault_plan
from quorum.server.schemas import (
    ClassPrediction,
    FailedModuleOut,
    ModulesUsed,
    PredictResponse,
    RegressionResponse,
    SpecialistAnswer,
    SpecialistInfo,
    SpecialistResponse,
    ValuePrediction,
)

__all__ = ["router"]

router = APIRouter(tags=["predict"])

_N = TypeVar("_N", int, float)
_QUERY = frozenset({"budget", "deadline_ms", "delay_ms", "drop", "fail", "nan", "seed", "specialist"})
# Query parameters are read from the request by hand (FastAPI's per-parameter solving cost a
# fifth of the throughput of a one-image request; docs/RESULTS.md) and documented here.
_QUERY_DOCS: list[dict[str, Any]] = [
    {
        "name": "budget",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "Evaluate the first `budget` available modules of the anytime order (default: all).",
    },
    {
        "name": "deadline_ms",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "exclusiveMinimum": 0},
        "description": "Anytime prediction: answer with the modules, in order, that finish within this time.",
    },
    {
        "name": "drop",
        "in": "query",
        "required": False,
        "schema": {"anyOf": [{"type": "number", "minimum": 0, "exclusiveMaximum": 1}, {"type": "integer"}]},
        "description": "Fault injection: a fraction in [0, 1) or a count of modules made unavailable at random.",
    },
    {
        "name": "fail",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": r"^\d+(,\d+)*$"},
        "description": "Fault injection (admins, or when enabled): comma-separated module ids whose runs raise.",
    },
    {
        "name": "nan",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": r"^\d+(,\d+)*$"},
        "description": "Fault injection (admins, or when enabled): module ids whose logits become NaN.",
    },
    {
        "name": "delay_ms",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0},
        "description": "Fault injection (admins, or when enabled): latency added before every module run.",
    },
    {
        "name": "seed",
        "in": "query",
        "required": False,
        "schema": {"type": "integer"},
        "description": "Seeds the random choice of dropped modules.",
    },
    {
        "name": "specialist",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "A class index or name: answer 'is it this class?' with that class's specialist subset "
        "(`budget` and `drop` then act on the subset).",
    },
]


def _parse_drop(value: str | None) -> int | float | None:
    """`drop=3` is a count of modules, `drop=0.25` a fraction."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise ApiError(422, f"drop={value!r} is not a number; give a fraction in [0, 1) or a count") from None


def _modules(result: Prediction) -> ModulesUsed:
    return ModulesUsed(
        requested=result.requested,
        used=result.used,
        dropped=result.dropped,
        failed=[FailedModuleOut(id=f.id, reason=f.reason, kind=f.kind) for f in result.failed if not f.injected],
        injected=[FailedModuleOut(id=f.id, reason=f.reason, kind=f.kind) for f in result.failed if f.injected],
        unfinished=result.unfinished,
    )


@router.post(
    "/predict",
    response_model=PredictResponse | SpecialistResponse | RegressionResponse,
    openapi_extra={"requestBody": OPENAPI_REQUEST_BODY, "parameters": _QUERY_DOCS},
    responses={
        400: {"description": "The body is not valid JSON or .npy."},
        413: {"description": "The body or the batch exceeds its limit."},
        415: {"description": "An unsupported Content-Type."},
        422: {"description": "Wrong shape, dtype or values; a bad query parameter; `specialist` without classes."},
        503: {"description": "No module could answer."},
    },
)
async def predict(request: Request) -> PredictResponse | SpecialistResponse | RegressionResponse:
    """Predict for a batch with a budgeted quorum of modules, or ask one class's specialists.

    A classification bundle answers labels and probabilities; a regression or count bundle
    answers per input a value for each of its outputs (`targets`).

    The body is JSON `{"inputs": [...]}`, or binary: raw bytes (`application/octet-stream`
    with headers `X-Shape: N,784` and `X-Dtype: float32|uint8`) or a `.npy` file
    (`application/x-npy`).
    """
    # The engine and settings are read here rather than injected: each FastAPI dependency
    # costs a measurable share of a sub-millisecond request (docs/RESULTS.md, HTTP).
    engine, settings = get_engine(request), get_settings(request)
    q = request.query_params
    unknown = sorted(set(q) - _QUERY)
    if unknown:
        raise ApiError(422, f"unknown query parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_QUERY))}")
    budget, seed = _number(q, "budget", int), _number(q, "seed", int)
    inputs = await read_inputs(request, settings.max_batch)
    deadline = _number(q, "deadline_ms", float)
    drop, specialist = _parse_drop(q.get("drop")), q.get("specialist")
    faults = _faults(request, q.get("fail"), q.get("nan"), _number(q, "delay_ms", float), seed)
    args = (engine, request.app.state.metrics, inputs, budget, drop, seed, specialist, deadline, faults)
    if not engine.may_wait(faults):
        # One bounded packed call (~0.1-3 ms): answered on the event loop, which saves a thread
        # hand-off that costs as much as the work (docs/RESULTS.md, HTTP).
        return _answer(*args)
    return await run_in_threadpool(_answer, *args)  # isolated path or faults: waits on module deadlines


def _ids(value: str | None, name: str) -> frozenset[int]:
    if not value:
        return frozenset()
    try:
        return frozenset(int(v) for v in value.split(","))
    except ValueError:
        raise ApiError(422, f"query {name}={value!r} must be comma-separated module ids, e.g. {name}=3,17") from None


def _faults(
    request: Request, fail: str | None, nan: str | None, delay_ms: float | None, seed: int | None
) -> FaultPlan | None:
    return fault_plan(request, _ids(fail, "fail"), _ids(nan, "nan"), delay_ms, seed)


def _number(q: QueryParams, name: str, kind: type[_N]) -> _N | None:
    """Query parameter `name` as an int or a float; a 422 naming it when it is not one."""
    value = q.get(name)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ApiError(422, f"query {name}={value!r} is not {what}") from None


def _answer(
    engine: Engine,
    metrics: Metrics,
    inputs: Any,
    budget: int | None,
    drop: int | float | None,
    seed: int | None,
    specialist: str | None,
    deadline_ms: float | None,
    faults: FaultPlan | None,
) -> PredictResponse | SpecialistResponse | RegressionResponse:
    if specialist is not None:
        spec = engine.predict_specialist(
            inputs, specialist, budget=budget, drop=drop, seed=seed, deadline_ms=deadline_ms, faults=faults
        )
        metrics.observe_answer(spec.prediction)
        return SpecialistResponse(
            specialist=SpecialistInfo(
                class_index=spec.class_index, class_name=spec.class_name, subset=spec.subset, val_f1=spec.val_f1
            ),
            predictions=[
                SpecialistAnswer(is_class=yes, probability=p)
                for yes, p in zip(spec.is_class.tolist(), spec.probability.tolist(), strict=True)
            ],
            modules=_modules(spec.prediction),
            degraded=spec.prediction.degraded,
            latency_ms=round(spec.prediction.latency_ms, 3),
        )
    result = engine.predict(inputs, budget=budget, drop=drop, seed=seed, deadline_ms=deadline_ms, faults=faults)
    metrics.observe_answer(result)
    if result.task != "classification":
        targets = engine.manifest.task.target_names
        return RegressionResponse(
            task=result.task,
            targets=targets,
            predictions=[ValuePrediction(values=dict(zip(targets, v, strict=True))) for v in result.values.tolist()],
            modules=_modules(result),
            degraded=result.degraded,
            latency_ms=round(result.latency_ms, 3),
        )
    return PredictResponse(
        predictions=[
            ClassPrediction(label=label, class_name=name, probabilities=p)
            for label, name, p in zip(
                result.labels.tolist(), result.class_names, result.probabilities.tolist(), strict=True
            )
        ],
        modules=_modules(result),
        degraded=result.degraded,
        latency_ms=round(result.latency_ms, 3),
    )
