"""The KServe v2 (Open Inference) protocol beside /predict.

    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer

`budget`, `deadline_ms`, `drop`, `seed` and `specialist` travel in the request's `parameters`; the response's
`parameters` report the modules requested, used and failed, and `degraded`. Input tensors come
as JSON `data` or, with Triton's binary extension (what `tritonclient` sends by default), as
raw bytes after the JSON header. Outputs are JSON: `probabilities` (FP32 [N, K]) and `label`
(INT64 [N]); for a specialist query, `is_class` (BOOL [N]) and `probability` (FP32 [N]); for a
regression or count bundle, `value` (FP32 [N, D]: predicted values or expected counts).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from quorum.runtime.engine import Engine, Prediction
from quorum.runtime.faults import FaultPlan
from quorum.server.deps import get_engine, get_settings
from quorum.server.errors import ApiError
from quorum.server.routes.admin import fault_plan

__all__ = ["router"]

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}
PARAMETERS = frozenset({"budget", "deadline_ms", "delay_ms", "drop", "fail", "nan", "seed", "specialist"})
# Triton's binary extension: clients may ask for binary outputs; answers are JSON, which they read too.
IGNORED = frozenset({"binary_data_output"})


_NUMBER: dict[str, Any] = {"type": "number"}
_IDS = {"type": "string", "description": "Module ids, comma-separated (fault injection, when allowed)."}
# The JSON header of an inference request, for the OpenAPI schema (the route reads the body
# itself: with Triton's binary extension, raw tensor bytes follow the JSON).
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "budget": {"type": "integer", "minimum": 1, "description": "Modules to evaluate, in anytime order."},
                "deadline_ms": {**_NUMBER, "exclusiveMinimum": 0},
                "drop": {**_NUMBER, "minimum": 0, "description": "A fraction in [0, 1) or a count of modules."},
                "seed": {"type": "integer"},
                "specialist": {"type": ["string", "integer"], "description": "A class index or name."},
                "delay_ms": {**_NUMBER, "minimum": 0},
                "fail": _IDS,
                "nan": _IDS,
                "binary_data_output": {"type": "boolean", "description": "Accepted; outputs are JSON."},
            },
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string", "enum": sorted(DATATYPES)},
                    "data": {"type": "array", "description": "Row-major values, flat or nested."},
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                    },
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        },
    },
}


def _json(data: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


@router.get("/health/live")
async def live() -> Response:
    """Live: the process answers."""
    return _json({"live": True})


@router.get("/health/ready", responses={503: {"description": "No bundle loaded or no healthy module."}})
async def ready(request: Request) -> Response:
    """Ready: a bundle is loaded with at least one healthy module."""
    engine = getattr(request.app.state, "engine", None)
    ok = engine is not None and bool(engine.healthy_ids)
    return _json({"ready": ok}, 200 if ok else 503)


def _model(request: Request, name: str) -> Engine:
    engine = get_engine(request)
    if name != engine.manifest.name:
        raise ApiError(404, f"no model {name!r}; this server serves {engine.manifest.name!r}")
    return engine


@router.get("/models/{name}")
async def metadata(request: Request, name: str) -> Response:
    """The model's name, platform, and input and output tensors."""
    engine = _model(request, name)
    m = engine.manifest
    outputs = (
        [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, m.num_classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ]
        if m.task.kind == "classification"
        else [{"name": "value", "datatype": "FP32", "shape": [-1, m.num_classes]}]
    )
    return _json(
        {
            "name": m.name,
            "versions": ["1"],
            "platform": "quorum",
            "inputs": [{"name": m.input.name, "datatype": "FP32", "shape": [-1, *m.input.shape]}],
            "outputs": outputs,
            "parameters": {"modules": engine.num_modules, "healthy_modules": len(engine.healthy_ids)},
        }
    )


@router.get("/models/{name}/ready", responses={503: {"description": "No healthy module."}})
async def model_ready(request: Request, name: str) -> Response:
    engine = _model(request, name)
    ok = bool(engine.healthy_ids)
    return _json({"name": name, "ready": ok}, 200 if ok else 503)


@router.post(
    "/models/{name}/infer",
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_REQUEST_SCHEMA}}}
    },
    responses={
        400: {"description": "Not JSON, or a broken binary-data framing."},
        413: {"description": "The body or the batch exceeds its limit."},
        422: {"description": "Wrong tensors or parameters."},
        503: {"description": "No module could answer."},
    },
)
async def infer(request: Request, name: str) -> Response:
    """One inference request of the v2 protocol."""
    engine = _model(request, name)
    header, tensor = _parse(await request.body(), request.headers.get("inference-header-content-length"), engine)
    if len(tensor) > get_settings(request).max_batch:
        raise ApiError(413, f"batch of {len(tensor)} inputs exceeds the limit of {get_settings(request).max_batch}")
    params = header.get("parameters") or {}
    if not isinstance(params, dict) or (unknown := sorted(set(params) - PARAMETERS - IGNORED)):
        raise ApiError(
            422,
            f"unknown parameters {params if not isinstance(params, dict) else unknown}; "
            f"known: {', '.join(sorted(PARAMETERS))}",
        )
    budget, drop, seed = _int(params, "budget"), params.get("drop"), _int(params, "seed")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, int | float)):
        raise ApiError(422, f"parameter drop={drop!r} must be a fraction in [0, 1) or a count")
    specialist, deadline = params.get("specialist"), _number(params, "deadline_ms")
    faults = fault_plan(request, _ids(params, "fail"), _ids(params, "nan"), _number(params, "delay_ms"), seed)
    args = (engine, tensor, budget, drop, seed, specialist, deadline, faults)
    outputs, pred = await run_in_threadpool(_run, *args) if engine.may_wait(faults) else _run(*args)
    request.app.state.metrics.observe_answer(pred)
    wanted = [o.get("name") for o in header.get("outputs") or [] if isinstance(o, dict)]
    if wanted:
        if missing := [w for w in wanted if w not in {o["name"] for o in outputs}]:
            raise ApiError(422, f"unknown outputs {missing}; this model gives {[o['name'] for o in outputs]}")
        outputs = [o for o in outputs if o["name"] in wanted]
    body: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": outputs, "parameters": _report(pred)}
    if "id" in header:
        body["id"] = header["id"]
    return _json(body)


def _run(
    engine: Engine,
    tensor: np.ndarray,
    budget: int | None,
    drop: int | float | None,
    seed: int | None,
    specialist: Any,
    deadline: float | None,
    faults: FaultPlan | None,
) -> tuple[list[dict[str, Any]], Prediction]:
    """The engine's answer as v2 output tensors."""
    if specialist is not None:
        spec = engine.predict_specialist(
            tensor, str(specialist), budget=budget, drop=drop, seed=seed, deadline_ms=deadline, faults=faults
        )
        n = len(spec.is_class)
        return [
            {"name": "is_class", "datatype": "BOOL", "shape": [n], "data": spec.is_class.tolist()},
            {"name": "probability", "datatype": "FP32", "shape": [n], "data": spec.probability.tolist()},
        ], spec.prediction
    pred = engine.predict(tensor, budget=budget, drop=drop, seed=seed, deadline_ms=deadline, faults=faults)
    if pred.task != "classification":
        n, d = pred.values.shape
        return [{"name": "value", "datatype": "FP32", "shape": [n, d], "data": pred.values.ravel().tolist()}], pred
    n, k = pred.probabilities.shape
    return [
        {"name": "probabilities", "datatype": "FP32", "shape": [n, k], "data": pred.probabilities.ravel().tolist()},
        {"name": "label", "datatype": "INT64", "shape": [n], "data": pred.labels.tolist()},
    ], pred


def _report(pred: Prediction) -> dict[str, Any]:
    return {
        "modules_requested": pred.requested,
        "modules_used": len(pred.used),
        "modules_failed": sum(not f.injected for f in pred.failed),
        "modules_injected": sum(f.injected for f in pred.failed),
        "modules_dropped": len(pred.dropped),
        "modules_unfinished": len(pred.unfinished),
        "degraded": pred.degraded,
        "latency_ms": round(pred.latency_ms, 3),
    }


def _ids(params: dict[str, Any], key: str) -> frozenset[int]:
    """Module ids as an integer or a comma-separated string (parameters are scalars)."""
    value = params.get(key)
    if value is None:
        return frozenset()
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return frozenset({value})
        if isinstance(value, str):
            return frozenset(int(v) for v in value.split(","))
    except ValueError:
        pass
    raise ApiError(422, f"parameter {key}={value!r} must be a module id or comma-separated ids")


def _number(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ApiError(422, f"parameter {key}={value!r} must be a number")
    return value


def _int(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"parameter {key}={value!r} must be an integer")
    return value


def _parse(body: bytes, header_length: str | None, engine: Engine) -> tuple[dict[str, Any], np.ndarray]:
    """The request's JSON header and its one input tensor as an array."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(
                400, f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body"
            )
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ApiError(422, "the request must be a JSON object with `inputs`")
    inputs = header.get("inputs")
    spec = engine.manifest.input
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(422, f"`inputs` must hold exactly one tensor, named {spec.name!r}")
    t = inputs[0]
    if t.get("name") != spec.name:
        raise ApiError(422, f"input tensor {t.get('name')!r}: this model's input is named {spec.name!r}")
    dtype = DATATYPES.get(str(t.get("datatype")))
    if dtype is None:
        raise ApiError(422, f"datatype {t.get('datatype')!r} is not one of {', '.join(DATATYPES)}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ApiError(422, f"shape {shape!r} must be a list of sizes, e.g. [N, {', '.join(map(str, spec.shape))}]")
    count = math.prod(shape)
    size = (t.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary) or size != count * dtype.itemsize:
            raise ApiError(
                400,
                f"binary_data_size {size!r} disagrees with {len(binary)} bytes after the header or with the "
                f"shape {shape} of {t['datatype']} ({count * dtype.itemsize} bytes)",
            )
        return header, np.frombuffer(binary, dtype=dtype).reshape(shape)
    data = t.get("data")
    if data is None:
        raise ApiError(422, "the input tensor has neither `data` nor binary data")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise ApiError(422, f"input data are not {t['datatype']} numbers: {e}") from None
    if array.size != count:
        raise ApiError(422, f"input data hold {array.size} values; shape {shape} needs {count}")
    return header, array.reshape(shape)
