"""POST /predict: translate HTTP to `Engine.predict` and back. No computation here."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from quorum.runtime.engine import Prediction
from quorum.server.body import OPENAPI_REQUEST_BODY, read_inputs
from quorum.server.deps import EngineDep, SettingsDep
from quorum.server.errors import ApiError
from quorum.server.schemas import (
    ClassPrediction,
    FailedModuleOut,
    ModulesUsed,
    PredictResponse,
    SpecialistAnswer,
    SpecialistInfo,
    SpecialistResponse,
)

__all__ = ["router"]

router = APIRouter(tags=["predict"])

_QUERY = frozenset({"budget", "drop", "seed", "specialist"})


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
        failed=[FailedModuleOut(id=f.id, reason=f.reason) for f in result.failed],
    )


async def _inputs(request: Request, settings: SettingsDep) -> Any:
    return await read_inputs(request, settings.max_batch)


@router.post(
    "/predict",
    response_model=PredictResponse | SpecialistResponse,
    openapi_extra={"requestBody": OPENAPI_REQUEST_BODY},
    responses={
        400: {"description": "The body is not valid JSON or .npy."},
        413: {"description": "The body or the batch exceeds its limit."},
        415: {"description": "An unsupported Content-Type."},
        422: {"description": "Wrong shape, dtype or values; a bad query parameter."},
        503: {"description": "No module could answer."},
    },
)
def predict(
    inputs: Annotated[Any, Depends(_inputs)],
    request: Request,
    engine: EngineDep,
    budget: int | None = Query(None, description="Evaluate the first `budget` available modules of the anytime order."),
    drop: str | None = Query(None, description="Fault injection: a fraction in [0, 1) or a count of modules to drop."),
    seed: int | None = Query(None, description="Seeds the random choice of dropped modules."),
    specialist: str | None = Query(
        None,
        description="A class index or name: answer 'is it this class?' with that class's specialist subset "
        "(`budget` and `drop` then act on the subset).",
    ),
) -> PredictResponse | SpecialistResponse:
    """Classify a batch with a budgeted quorum of modules, or ask one class's specialists.

    The body is JSON `{"inputs": [...]}`, or binary: raw bytes (`application/octet-stream`
    with headers `X-Shape: N,784` and `X-Dtype: float32|uint8`) or a `.npy` file
    (`application/x-npy`).
    """
    unknown = sorted(set(request.query_params) - _QUERY)
    if unknown:
        raise ApiError(422, f"unknown query parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_QUERY))}")
    if specialist is not None:
        spec = engine.predict_specialist(inputs, specialist, budget=budget, drop=_parse_drop(drop), seed=seed)
        return SpecialistResponse(
            specialist=SpecialistInfo(
                class_index=spec.class_index, class_name=spec.class_name, subset=spec.subset, val_f1=spec.val_f1
            ),
            predictions=[
                SpecialistAnswer(is_class=bool(yes), probability=float(p))
                for yes, p in zip(spec.is_class.tolist(), spec.probability.tolist(), strict=True)
            ],
            modules=_modules(spec.prediction),
            degraded=spec.prediction.degraded,
            latency_ms=round(spec.prediction.latency_ms, 3),
        )
    result = engine.predict(inputs, budget=budget, drop=_parse_drop(drop), seed=seed)
    probs = result.probabilities.tolist()
    return PredictResponse(
        predictions=[
            ClassPrediction(label=int(label), class_name=name, probabilities=p)
            for label, name, p in zip(result.labels.tolist(), result.class_names, probs, strict=True)
        ],
        modules=_modules(result),
        degraded=result.degraded,
        latency_ms=round(result.latency_ms, 3),
    )
