"""The FastAPI applications, with no global state:

- `create_app(settings, engine=None)`: `quorum serve`, a bundle or a shard of one;
- `create_gateway_app(settings, gateway=None)`: `quorum gateway`, the same public API over shards;
- `create_admin_app(app)`: with QUORUM_ADMIN_PORT set, /admin/* and /metrics leave the public
  app and are served on their own port, over the same state (engine, metrics, reloads), so
  that a Service or a firewall can expose the public port alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

import quorum
from quorum.server.dataplane import DataPlane
from quorum.server.deps import load_engine
from quorum.server.errors import install_error_handlers
from quorum.server.gateway import Gateway
from quorum.server.limits import BodySizeLimit, InFlightLimit
from quorum.server.metrics import Metrics, RequestMetrics, ShardCollector
from quorum.server.reload import Leases, install_sighup
from quorum.server.routes import admin, health, kserve, predict, shard
from quorum.server.settings import MIN_TOKEN_LENGTH, ApiSettings, GatewaySettings, Settings

__all__ = ["create_admin_app", "create_app", "create_gateway_app", "load_engine"]

log = logging.getLogger(__name__)


def _api_app(
    settings: ApiSettings,
    engine: Any,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    title: str,
) -> FastAPI:
    """The public API's state, routes and middleware, for a server and a gateway alike."""
    app = FastAPI(
        title=title,
        version=quorum.__version__,
        summary="Budgeted predictions from a λ-ensemble that degrades gracefully.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.reload_lock = asyncio.Lock()
    app.state.metrics = Metrics(lambda: app.state.engine)
    app.state.leases = Leases()
    app.state.dataplane = DataPlane(app.state.metrics, app.state.leases)
    install_error_handlers(app)
    app.include_router(predict.router)
    app.include_router(health.router)
    app.include_router(kserve.router)
    if settings.admin_port is None:
        app.include_router(health.metrics_router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Before the body is read: a burst beyond the limit costs a 503 each, not a buffered body each.
    app.add_middleware(
        InFlightLimit,
        max_in_flight=settings.max_in_flight,
        on_reject=lambda: app.state.metrics.rejected.labels("overload").inc(),
    )
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)  # outermost: counts the 413s and 503s too
    return app


def _warn_about_the_token(settings: ApiSettings) -> None:
    if settings.admin_token is not None and not settings.admin_enabled:
        log.warning(
            "QUORUM_ADMIN_TOKEN is set but shorter than %d characters: the admin API stays off", MIN_TOKEN_LENGTH
        )


def create_app(settings: Settings, engine: Any = None) -> FastAPI:
    """The server of a bundle (or of its shard). The engine is loaded in the lifespan handler
    unless one is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _warn_about_the_token(settings)
        owned = app.state.engine is None
        if owned:
            app.state.engine = load_engine(settings)
        sighup = install_sighup(app)
        yield
        if sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if owned:
            app.state.engine.close()  # the isolated path's worker threads

    app = _api_app(settings, engine, lifespan, "Quorum")
    app.include_router(shard.router)
    if settings.admin_port is None:
        app.include_router(admin.router)
    return app


def create_gateway_app(settings: GatewaySettings, transports: Mapping[str, Any] | None = None) -> FastAPI:
    """The public API over shards. The gateway connects to them in the lifespan handler and checks
    their health every `settings.health_interval_s`; `transports`: how to reach a shard's URL other
    than over TCP (tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _warn_about_the_token(settings)
        app.state.engine = await Gateway.connect(
            settings.shards,
            shard_timeout_s=settings.shard_timeout_ms / 1e3,
            wait_s=settings.connect_wait_s,
            coalesce_rows=settings.coalesce_rows,
            transports=transports,
        )
        app.state.engine.start_health_checks(settings.health_interval_s)
        yield
        await app.state.engine.aclose()

    app = _api_app(settings, None, lifespan, "Quorum gateway")
    app.state.metrics.registry.register(ShardCollector(lambda: app.state.engine))
    return app


def create_admin_app(app: FastAPI, *, admin_routes: bool = True) -> FastAPI:
    """/admin/* (unless not `admin_routes`) and /metrics over `app`'s state, for QUORUM_ADMIN_PORT."""
    admin_app = FastAPI(title="Quorum admin", version=quorum.__version__)
    admin_app.state = app.state  # the same engine, metrics and reload lock: a reload here serves there
    install_error_handlers(admin_app)
    if admin_routes:
        admin_app.include_router(admin.router)
    admin_app.include_router(health.metrics_router)
    admin_app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    admin_app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    return admin_app
