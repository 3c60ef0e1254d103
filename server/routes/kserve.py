"""The KServe v2 (Open Inference) protocol beside /predict.

    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer

`budget`, `deadline_ms`, `drop`, `seed` and `specialist` travel in the request's `parameters`,
read by the data plane's one parser; `kserve_codec` decodes the tensors and encodes the answer.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from quorum.server import kserve_codec
from quorum.server.dataplane import predict_options
from quorum.server.deps import get_engine, get_settings
from quorum.server.errors import ApiError
from quorum.server.rest_codec import OFF_LOOP_BYTES

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["router"]

router = APIRouter(prefix="/v2", tags=["kserve-v2"])


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
    outputs = kserve_codec.outputs_of(m.task.task, m.num_classes)
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
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": kserve_codec.INFER_REQUEST_SCHEMA}},
        }
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
    settings = get_settings(request)
    body = await request.body()
    decode = partial(
        kserve_codec.decode,
        body,
        request.headers.get("inference-header-content-length"),
        engine.manifest.input,
        settings.max_elements,
    )
    header, tensor, params = await run_in_threadpool(decode) if len(body) > OFF_LOOP_BYTES else decode()
    if len(tensor) > settings.max_batch:
        raise ApiError(413, f"batch of {len(tensor)} inputs exceeds the limit of {settings.max_batch}; split it")
    options = predict_options(params, request, kind="parameter")
    pred = await request.app.state.dataplane.infer(engine, tensor, options)
    return _json(kserve_codec.encode(header, pred, engine.manifest.task.task, name))
