"""The FastAPI applications: `create_app(settings, engine=None)`, no global state.

With QUORUM_ADMIN_PORT set, the public app leaves out /admin/* and /metrics, and
`create_admin_app(app)` serves them on their own port, over the same state (engine, metrics,
reloads), so that a Service or a firewall can expose the public port alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import quorum
from quorum.runtime.engine import Engine
from quorum.server.dataplane import DataPlane
from quorum.server.deps import load_engine
from quorum.server.errors import install_error_handlers
from quorum.server.limits import BodySizeLimit, InFlightLimit
from quorum.server.metrics import Metrics, RequestMetrics
from quorum.server.reload import Leases, install_sighup
from quorum.server.routes import admin, health, kserve, predict
from quorum.server.settings import MIN_TOKEN_LENGTH, Settings

__all__ = ["create_admin_app", "create_app", "load_engine"]

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. The engine is loaded in the lifespan handler unless one is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.admin_token is not None and not settings.admin_enabled:
            log.warning(
                "QUORUM_ADMIN_TOKEN is set but shorter than %d characters: the admin API stays off", MIN_TOKEN_LENGTH
            )
        owned = app.state.engine is None
        if owned:
            app.state.engine = load_engine(settings)
        sighup = install_sighup(app)
        yield
        if sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if owned:
            app.state.engine.close()  # the isolated path's worker threads

    app = FastAPI(
        title="Quorum",
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
        app.include_router(admin.router)
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


def create_admin_app(app: FastAPI) -> FastAPI:
    """/admin/* and /metrics over `app`'s state, for QUORUM_ADMIN_PORT."""
    admin_app = FastAPI(title="Quorum admin", version=quorum.__version__)
    admin_app.state = app.state  # the same engine, metrics and reload lock: a reload here serves there
    install_error_handlers(admin_app)
    admin_app.include_router(admin.router)
    admin_app.include_router(health.metrics_router)
    admin_app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    admin_app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    return admin_app
