"""The /predict protocol's codec: request bodies in, answers out.

Bodies: JSON, raw float32/uint8 bytes, or a .npy file:

    application/json           {"inputs": [[...], ...]}                      parsed with orjson
    application/octet-stream   little-endian bytes, row-major; shape in the X-Shape header
                               ("64,784"), dtype in X-Dtype (float32 or uint8; default float32)
    application/x-npy          one array saved by numpy.save (no pickles)

JSON is what every client can send; the binary bodies skip text parsing and the conversion of
nested lists to an array, which dominate the cost of a large batch (docs/RESULTS.md measures it).
Each format checks only its own framing here; the engine checks shape, dtype and values.
Answers: labels and probabilities, a specialist's yes/no, or values per target, with the
modules used, dropped and failed.
"""

from __future__ import annotations

import io
import math
from functools import partial
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from quorum.core.tasks import Task
from quorum.runtime.preprocess import as_array
from quorum.runtime.results import Prediction
from quorum.server.errors import ApiError
from quorum.server.schemas import (
    ClassPrediction,
    FailedModuleOut,
    ModulesUsed,
    PredictRequest,
    PredictResponse,
    RegressionResponse,
    SpecialistAnswer,
    SpecialistInfo,
    SpecialistResponse,
    UncertaintyOut,
    ValuePrediction,
)

__all__ = ["BINARY_DTYPES", "MEDIA_TYPES", "OPENAPI_REQUEST_BODY", "encode", "read_inputs"]

BINARY_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}
MEDIA_TYPES = ("application/json", "application/octet-stream", "application/x-npy")

OPENAPI_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Row-major little-endian values; headers X-Shape (e.g. 64,784) and X-Dtype.",
        },
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
    },
}


MAX_DIMENSIONS = 8  # of a binary body's X-Shape: inputs are (N, *shape) of a few axes
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in the thread pool, not on the event loop


async def read_inputs(request: Request, max_batch: int, max_elements: int) -> np.ndarray:
    """The request's batch of raw inputs as one array, within the batch and element limits
    (413 beyond). Large bodies are decoded off the event loop."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    body = await request.body()
    decode: Any
    if media == "application/json" or media.endswith("+json"):
        decode = partial(_json_inputs, body, max_elements + max_batch)
    elif media == "application/octet-stream":
        decode = partial(_raw_inputs, body, request.headers.get("x-shape"), request.headers.get("x-dtype"))
    elif media == "application/x-npy":
        decode = partial(_npy_inputs, body)
    else:
        raise ApiError(415, f"Content-Type must be one of {', '.join(MEDIA_TYPES)}; got {content_type[:80]!r}")
    inputs: np.ndarray = await run_in_threadpool(decode) if len(body) > OFF_LOOP_BYTES else decode()
    if inputs.ndim and len(inputs) > max_batch:
        raise ApiError(413, f"batch of {len(inputs)} inputs exceeds the limit of {max_batch}; split it")
    if inputs.size > max_elements:
        raise ApiError(413, f"the inputs hold {inputs.size} numbers, over the limit of {max_elements}; split them")
    return inputs


def _json_inputs(body: bytes, max_numbers: int) -> np.ndarray:
    if not body.strip():
        raise ApiError(422, 'request body is empty; send JSON like {"inputs": [[...], ...]}')
    # Each number but the last of a list is followed by a comma: a cheap bound before parsing.
    if body.count(b",") > max_numbers:
        raise ApiError(413, f"the body holds more than {max_numbers} numbers, over the limit; split it")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(422, f'body: expected a JSON object like {{"inputs": [...]}}, got {type(data).__name__}')
    if extra := sorted(set(data) - {"inputs"}):
        shown = ", ".join(k if len(k) <= 40 else k[:40] + "…" for k in extra[:5])
        raise ApiError(422, f"body {shown}: unknown field(s); the body holds only `inputs`")
    if "inputs" not in data:
        raise ApiError(422, "body inputs: field required")
    inputs = data["inputs"]
    if not isinstance(inputs, list):
        raise ApiError(422, f"body inputs: expected a list of inputs, got {type(inputs).__name__}")
    return as_array(inputs)


def _raw_inputs(body: bytes, shape_header: str | None, dtype_header: str | None) -> np.ndarray:
    if shape_header is None:
        raise ApiError(422, "an application/octet-stream body needs an X-Shape header, e.g. X-Shape: 64,784")
    parts = shape_header.replace(" ", "").split(",")
    if not 1 <= len(parts) <= MAX_DIMENSIONS or not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise ApiError(
            422, f"X-Shape must be 1 to {MAX_DIMENSIONS} comma-separated sizes like 64,784; got {shape_header[:80]!r}"
        )
    shape = tuple(int(d) for d in parts)
    if any(d < 1 for d in shape):
        raise ApiError(422, f"X-Shape must hold positive sizes; got {shape_header!r}")
    name = (dtype_header or "float32").strip().lower()
    if name not in BINARY_DTYPES:
        raise ApiError(422, f"X-Dtype must be one of {', '.join(BINARY_DTYPES)}; got {name[:40]!r}")
    dtype = BINARY_DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise ApiError(422, f"body holds {len(body)} bytes; X-Shape {shape_header} of {name} needs {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _npy_inputs(body: bytes) -> np.ndarray:
    if not body.startswith(b"\x93NUMPY"):
        raise ApiError(400, "request body is not a .npy file: it must start as numpy.save writes it (\\x93NUMPY)")
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError... for a damaged file
        raise ApiError(400, f"request body is not a .npy array: {str(e)[:200]}") from None
    if not isinstance(array, np.ndarray) or array.ndim < 1:
        raise ApiError(422, "the .npy body must hold one array with a batch axis first")
    return array


def _modules(result: Prediction) -> ModulesUsed:
    return ModulesUsed(
        requested=result.requested,
        used=result.used,
        dropped=result.dropped,
        failed=[FailedModuleOut(id=f.id, reason=f.reason, kind=f.kind) for f in result.failed if not f.injected],
        injected=[FailedModuleOut(id=f.id, reason=f.reason, kind=f.kind) for f in result.failed if f.injected],
        unfinished=result.unfinished,
    )


def encode(
    result: Prediction, task: Task, target_names: list[str]
) -> PredictResponse | SpecialistResponse | RegressionResponse:
    """The answer of /predict: classes, a specialist's one-vs-all answer, or values per target."""
    modules, latency = _modules(result), round(result.latency_ms, 3)
    if (spec := result.specialist) is not None:
        return SpecialistResponse(
            specialist=SpecialistInfo(
                class_index=spec.class_index, class_name=spec.class_name, subset=spec.subset, val_f1=spec.val_f1
            ),
            predictions=[
                SpecialistAnswer(is_class=yes, probability=p)
                for yes, p in zip(spec.is_class.tolist(), spec.probability.tolist(), strict=True)
            ],
            modules=modules,
            degraded=result.degraded,
            latency_ms=latency,
        )
    if not task.has_classes:
        return RegressionResponse(
            task=result.task,
            targets=target_names,
            predictions=[
                ValuePrediction(values=dict(zip(target_names, v, strict=True))) for v in result.values.tolist()
            ],
            modules=modules,
            degraded=result.degraded,
            latency_ms=latency,
        )
    n = len(result.labels)
    per_input = result.per_input.tolist() if result.per_input is not None else [len(result.used)] * n
    spread = result.uncertainty
    assert spread is not None  # every classification answer has one
    mi = spread.mutual_information.tolist() if spread.mutual_information is not None else [None] * n
    votes = spread.vote_share.tolist() if spread.vote_share is not None else [None] * n
    right = spread.p_correct.tolist() if spread.p_correct is not None else [None] * n
    return PredictResponse(
        predictions=[
            ClassPrediction(
                label=label,
                class_name=name,
                probabilities=p,
                modules_used=b,
                uncertainty=UncertaintyOut(entropy=h, mutual_information=i, vote_share=v, p_correct=r),
            )
            for label, name, p, b, h, i, v, r in zip(
                result.labels.tolist(),
                result.class_names,
                result.probabilities.tolist(),
                per_input,
                spread.entropy.tolist(),
                mi,
                votes,
                right,
                strict=True,
            )
        ],
        modules=modules,
        degraded=result.degraded,
        latency_ms=latency,
    )
