"""The shard protocol, on every `quorum serve`: what a gateway asks of the modules this process
serves (all of a bundle's, or those of `--modules` / `--shard`).

    GET  /shard/info       the bundle's digest and the state of the modules served here
    GET  /shard/manifest   the bundle's manifest, for a gateway that has no copy
    POST /shard/partial    the sum of the outputs of given modules on given inputs (`shard_codec`)
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from quorum.server import shard_codec
from quorum.server.deps import get_engine, get_settings
from quorum.server.rest_codec import OFF_LOOP_BYTES

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["manifest_digest", "router"]

router = APIRouter(prefix="/shard", tags=["shard"])


def manifest_digest(engine: Engine) -> str:
    """A fingerprint of the bundle served: shards of one gateway must serve the same one."""
    return hashlib.sha256(engine.manifest.model_dump_json().encode()).hexdigest()


@router.get("/info")
async def info(request: Request) -> dict[str, object]:
    """The bundle's digest; per module served here, [id, status, breaker, calls, failures]; and the
    most numbers a partial request may hold."""
    engine = get_engine(request)
    served = [m for m in engine.modules if m.status != "elsewhere"]
    return {
        "name": engine.manifest.name,
        "digest": manifest_digest(engine),
        "modules": [[m.id, m.status, m.breaker, m.calls, m.failures] for m in served],
        "in_rotation": engine.in_rotation(),
        "max_elements": get_settings(request).max_elements,
    }


@router.get("/manifest")
async def manifest(request: Request) -> Response:
    return Response(get_engine(request).manifest.model_dump_json(), media_type="application/json")


@router.post(
    "/partial",
    responses={
        400: {"description": "Not a shard request."},
        413: {"description": "Over the element limit."},
        422: {"description": "Wrong inputs or module ids."},
    },
)
async def partial_answer(request: Request) -> Response:
    """The sum of the outputs of the requested modules this shard runs, and why the others failed."""
    engine, settings = get_engine(request), get_settings(request)
    body = await request.body()
    decode = partial(
        shard_codec.decode_request, body, request.headers.get(shard_codec.HEADER_LENGTH), settings.max_elements
    )
    x, ids, deadline_ms, squares = await run_in_threadpool(decode) if len(body) > OFF_LOOP_BYTES else decode()
    result = await request.app.state.dataplane.partial(engine, x, ids, deadline_ms, squares)
    content, headers = shard_codec.encode_partial(result)
    return Response(content, headers=headers)
