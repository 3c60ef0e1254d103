"""POST /predict: the query and body decoded, the data plane's answer encoded. No computation here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from quorum.server.dataplane import SEED_SCHEMA, predict_options
from quorum.server.deps import get_engine, get_settings
from quorum.server.rest_codec import OPENAPI_REQUEST_BODY, encode, read_inputs
from quorum.server.schemas import PredictResponse, RegressionResponse, SpecialistResponse

__all__ = ["router"]

router = APIRouter(tags=["predict"])

# Query parameters are read from the request by hand (FastAPI's per-parameter solving cost a
# fifth of the throughput of a one-image request; docs/RESULTS.md) and documented here.
_QUERY_DOCS: list[dict[str, Any]] = [
    {
        "name": "budget",
        "in": "query",
        "required": False,
        "schema": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["auto"]}]},
        "description": "Evaluate the first `budget` available modules of the anytime order (default: all); "
        "`auto`: per input, stop at the first stage of the order that is confident enough.",
    },
    {
        "name": "tolerance",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0, "maximum": 1},
        "description": "budget=auto: the accuracy given up against the whole ensemble (default 0.001).",
    },
    {
        "name": "max_budget",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "budget=auto: the most modules an input may use (default: all).",
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
        "schema": SEED_SCHEMA,
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


@router.post(
    "/predict",
    response_model=PredictResponse | SpecialistResponse | RegressionResponse,
    openapi_extra={"requestBody": OPENAPI_REQUEST_BODY, "parameters": _QUERY_DOCS},
    responses={
        400: {"description": "The body is not valid JSON or .npy."},
        403: {"description": "Fault injection without the right to it."},
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
    options = predict_options(request.query_params, request, kind="query parameter")
    inputs = await read_inputs(request, settings.max_batch, settings.max_elements)
    result = await request.app.state.dataplane.infer(engine, inputs, options)
    task = engine.manifest.task
    return encode(result, task.task, task.target_names)
