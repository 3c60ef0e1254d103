"""Run the server with uvicorn: `quorum serve BUNDLE` calls `serve(settings)`."""

from __future__ import annotations

import asyncio

import uvicorn
from fastapi import FastAPI

from quorum.server.app import create_admin_app, create_app, create_gateway_app, load_engine
from quorum.server.settings import ApiSettings, GatewaySettings, Settings

__all__ = ["serve", "serve_gateway"]


def serve(settings: Settings) -> None:
    """Load the bundle and serve until interrupted. Fails fast if the bundle cannot be served.

    With `settings.admin_port`, /admin/* and /metrics are served there, in the same process."""
    engine = load_engine(settings)  # errors surface before binding
    app = create_app(settings, engine=engine)
    _run(app, create_admin_app(app), settings)


def serve_gateway(settings: GatewaySettings) -> None:
    """Serve the public API over `settings.shards` until interrupted; with `settings.admin_port`,
    /metrics there (a gateway has no admin routes: reloads and fault plans are the shards')."""
    if not settings.shards:
        raise ValueError("a gateway needs at least one shard: --shard URL (or QUORUM_SHARDS)")
    app = create_gateway_app(settings)
    _run(app, create_admin_app(app, admin_routes=False), settings)


def _run(app: FastAPI, admin_app: FastAPI, settings: ApiSettings) -> None:
    """Serve `app` on the public port, and `admin_app` on `settings.admin_port` if one is set."""
    if settings.admin_port is None:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
        return
    public = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))
    admin = uvicorn.Server(
        uvicorn.Config(
            admin_app,
            host=settings.admin_host,
            port=settings.admin_port,
            log_level=settings.log_level,
            lifespan="off",  # the public app's lifespan owns the engine
        )
    )

    async def both() -> None:
        await asyncio.gather(public.serve(), admin.serve())

    asyncio.run(both())
