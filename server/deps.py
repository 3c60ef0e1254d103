"""Typed dependencies of the routes, and how settings become an engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from quorum.runtime.errors import BundleError, NoModulesAvailable
from quorum.runtime.manifest import Manifest
from quorum.server.settings import Settings

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["EngineDep", "SettingsDep", "get_engine", "get_settings", "load_engine"]


def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NoModulesAvailable("the model is not loaded yet")
    return engine


def load_engine(settings: Settings) -> Engine:
    """The engine that `settings` describe: the whole bundle, or the shard of it they name."""
    modules = None
    if settings.modules is not None or settings.shard is not None:
        try:
            modules = settings.served_modules(len(Manifest.load(settings.bundle).modules))
        except ValueError as e:
            raise BundleError(str(e)) from None
    from quorum.runtime.engine import Engine  # here: a gateway imports this module without ONNX Runtime

    return Engine.load(
        settings.bundle,
        device=settings.device,
        executor=settings.executor,
        workers=settings.workers,
        module_timeout_ms=settings.module_timeout_ms,
        packed_cache_mb=settings.packed_cache_mb,
        packed_threads=settings.packed_threads,
        packed_compile=settings.packed_compile,
        wait_for_first=settings.wait_for_first,
        disagreement=settings.disagreement,
        breaker=(settings.breaker_failures, settings.breaker_window_s, settings.breaker_open_s),
        modules=modules,
    )


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _engine(request: Request) -> Engine:  # async: FastAPI runs sync dependencies in its thread pool
    return get_engine(request)


async def _settings(request: Request) -> Settings:
    return get_settings(request)


if TYPE_CHECKING:
    EngineDep = Annotated[Engine, Depends(_engine)]
else:  # a gateway serves these routes too, with no ONNX Runtime to import the engine's module from
    EngineDep = Annotated[object, Depends(_engine)]
SettingsDep = Annotated[Settings, Depends(_settings)]
