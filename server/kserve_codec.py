"""The KServe v2 (Open Inference) protocol's codec: inference requests in, answers out.

Input tensors come as JSON `data` or, with Triton's binary extension (what `tritonclient`
sends by default), as raw bytes after the JSON header (`Inference-Header-Content-Length`).
Outputs are JSON: `probabilities` (FP32 [N, K]) and `label` (INT64 [N]); for a specialist
query, `is_class` (BOOL [N]) and `probability` (FP32 [N]); for a task without classes,
`value` (FP32 [N, D]: predicted values or expected counts). The response's `parameters`
report the modules requested, used and failed, and `degraded`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from quorum.core.tasks import Task
from quorum.runtime.manifest import InputSpec
from quorum.runtime.results import Prediction
from quorum.server.dataplane import SEED_SCHEMA
from quorum.server.errors import ApiError

__all__ = ["DATATYPES", "IGNORED", "INFER_REQUEST_SCHEMA", "decode", "encode", "outputs_of"]

DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}
# Triton's binary extension: clients may ask for binary outputs; answers are JSON, which they read too.
IGNORED = frozenset({"binary_data_output"})
MAX_DIMENSIONS = 8  # of an input tensor's shape


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
                "budget": {
                    "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["auto"]}],
                    "description": "Modules to evaluate, in anytime order; auto: per input, until confident.",
                },
                "tolerance": {**_NUMBER, "minimum": 0, "maximum": 1, "description": "budget=auto's accuracy given up."},
                "max_budget": {"type": "integer", "minimum": 1, "description": "budget=auto's most modules."},
                "deadline_ms": {**_NUMBER, "exclusiveMinimum": 0},
                "drop": {**_NUMBER, "minimum": 0, "description": "A fraction in [0, 1) or a count of modules."},
                "seed": SEED_SCHEMA,
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


def decode(
    body: bytes, header_length: str | None, spec: InputSpec, max_elements: int
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """The request's JSON header, its one input tensor as an array, and its option parameters
    (Triton's `binary_data_output` left out: answers are JSON, which clients read too)."""
    header, tensor = _parse(body, header_length, spec, max_elements)
    params = header.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError(422, f"`parameters` must be a JSON object of options, got {type(params).__name__}")
    return header, tensor, {k: v for k, v in params.items() if k not in IGNORED}


def outputs_of(task: Task, num_outputs: int) -> list[dict[str, Any]]:
    """The model's output tensors, for its metadata."""
    if task.has_classes:
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_outputs]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            *({"name": name, "datatype": kind, "shape": [-1]} for name, kind in _PER_INPUT),
        ]
    return [{"name": "value", "datatype": "FP32", "shape": [-1, num_outputs]}]


def encode(header: dict[str, Any], pred: Prediction, task: Task, model_name: str) -> dict[str, Any]:
    """The response body: the requested outputs (all by default) and the modules' report."""
    outputs = _outputs(pred, task)
    wanted = header.get("outputs")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted
        ):
            raise ApiError(422, '`outputs` must be a list of objects with a "name", e.g. [{"name": "label"}]')
        names = [o["name"] for o in wanted]
        if missing := [w for w in names if w not in {o["name"] for o in outputs}]:
            shown = [w if len(w) <= 40 else w[:40] + "…" for w in missing[:5]]
            raise ApiError(422, f"unknown outputs {shown}; this model gives {[o['name'] for o in outputs]}")
        if names:
            outputs = [o for o in outputs if o["name"] in names]
    body: dict[str, Any] = {
        "model_name": model_name,
        "model_version": "1",
        "outputs": outputs,
        "parameters": _report(pred),
    }
    if "id" in header:
        body["id"] = header["id"]
    return body


def _outputs(pred: Prediction, task: Task) -> list[dict[str, Any]]:
    if (spec := pred.specialist) is not None:
        n = len(spec.is_class)
        return [
            {"name": "is_class", "datatype": "BOOL", "shape": [n], "data": spec.is_class.tolist()},
            {"name": "probability", "datatype": "FP32", "shape": [n], "data": spec.probability.tolist()},
        ]
    if not task.has_classes:
        n, d = pred.values.shape
        return [{"name": "value", "datatype": "FP32", "shape": [n, d], "data": pred.values.ravel().tolist()}]
    n, k = pred.probabilities.shape
    spread = pred.uncertainty
    assert spread is not None  # every classification answer has one
    per_input = {
        "modules_used": pred.per_input.tolist() if pred.per_input is not None else [len(pred.used)] * n,
        "entropy": spread.entropy.tolist(),
        "mutual_information": spread.mutual_information.tolist() if spread.mutual_information is not None else None,
        "vote_share": spread.vote_share.tolist() if spread.vote_share is not None else None,
        "p_correct": spread.p_correct.tolist() if spread.p_correct is not None else None,
    }
    return [
        {"name": "probabilities", "datatype": "FP32", "shape": [n, k], "data": pred.probabilities.ravel().tolist()},
        {"name": "label", "datatype": "INT64", "shape": [n], "data": pred.labels.tolist()},
        *(
            {"name": name, "datatype": kind, "shape": [n], "data": per_input[name]}
            for name, kind in _PER_INPUT
            if per_input[name] is not None
        ),
    ]


# per input, beside the label: modules its answer used, and its uncertainty
_PER_INPUT = (
    ("modules_used", "INT64"),
    ("entropy", "FP32"),
    ("mutual_information", "FP32"),
    ("vote_share", "FP32"),
    ("p_correct", "FP32"),
)


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


def _parse(
    body: bytes, header_length: str | None, spec: InputSpec, max_elements: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The request's JSON header and its one input tensor as an array."""
    binary = b""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise ApiError(
                400, f"Inference-Header-Content-Length {header_length[:40]!r} does not fit a {len(body)}-byte body"
            )
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ApiError(422, "the request must be a JSON object with `inputs`")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(422, f"`inputs` must hold exactly one tensor, named {spec.name!r}")
    t = inputs[0]
    if t.get("name") != spec.name:
        raise ApiError(422, f"input tensor {t.get('name')!r}: this model's input is named {spec.name!r}")
    dtype = DATATYPES.get(str(t.get("datatype")))
    if dtype is None:
        raise ApiError(422, f"datatype {t.get('datatype')!r} is not one of {', '.join(DATATYPES)}")
    shape = t.get("shape")
    example = f"[N, {', '.join(map(str, spec.shape))}]"
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMENSIONS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        shown = repr(shape) if len(repr(shape)) <= 80 else repr(shape)[:80] + "…"
        raise ApiError(422, f"shape {shown} must be 1 to {MAX_DIMENSIONS} sizes with the batch first, e.g. {example}")
    count = math.prod(shape)
    if count > max_elements:
        raise ApiError(413, f"shape {shape} holds {count} numbers, over the limit of {max_elements}; split the batch")
    tensor_params = t.get("parameters") or {}
    if not isinstance(tensor_params, dict):
        raise ApiError(
            422, f"the input tensor's `parameters` must be a JSON object, got {type(tensor_params).__name__}"
        )
    size = tensor_params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary) or size != count * dtype.itemsize:
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
        raise ApiError(422, f"input data are not {t['datatype']} numbers: {str(e)[:200]}") from None
    if array.size != count:
        raise ApiError(422, f"input data hold {array.size} values; shape {shape} needs {count}")
    return header, array.reshape(shape)
