"""The FastAPI application: `create_app(settings, engine=None)`, no global state."""

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
from quorum.server.limits import BodySizeLimit
from quorum.server.metrics import Metrics, RequestMetrics
from quorum.server.reload import install_sighup
from quorum.server.routes import admin, health, kserve, predict
from quorum.server.settings import Settings

__all__ = ["create_app", "load_engine"]

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. The engine is loaded in the lifespan handler unless one is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    app.state.dataplane = DataPlane(app.state.metrics)
    install_error_handlers(app)
    app.include_router(predict.router)
    app.include_router(health.router)
    app.include_router(kserve.router)
    app.include_router(admin.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)  # outermost: counts the 413s too
    return app
