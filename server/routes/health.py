"""Liveness, readiness, module state and service info."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from quorum.server.deps import EngineDep
from quorum.server.metrics import CONTENT_TYPE_LATEST
from quorum.server.schemas import ModulesResponse, ModuleStatusOut, ServiceInfo

__all__ = ["metrics_router", "router"]

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metrics"])  # served beside /admin when QUORUM_ADMIN_PORT is set


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Live: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "No engine or no healthy module."}})
def readyz(request: Request) -> JSONResponse:
    """Ready: a bundle is loaded and at least one module is healthy."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.healthy_ids:
        return JSONResponse({"error": "not ready: no healthy module loaded"}, status_code=503)
    return JSONResponse(
        {"status": "ready", "healthy_modules": len(engine.healthy_ids), "total_modules": engine.num_modules}
    )


@router.get("/modules", response_model=ModulesResponse)
def modules(engine: EngineDep) -> ModulesResponse:
    """Per-module state: healthy or quarantined (with why), calls, failures, mean latency."""
    out = [ModuleStatusOut.model_validate(m, from_attributes=True) for m in engine.modules]
    return ModulesResponse(healthy=len(engine.healthy_ids), total=engine.num_modules, modules=out)


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, modules per answer, module outcomes and readiness."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_model=ServiceInfo)
def info(engine: EngineDep) -> ServiceInfo:
    """What is being served."""
    m = engine.manifest
    return ServiceInfo(
        name=m.name,
        bundle=str(engine.bundle_dir),
        num_modules=engine.num_modules,
        healthy_modules=len(engine.healthy_ids),
        classes=m.task.class_names,
        task=m.task.kind,
        targets=m.task.target_names,
        input_shape=m.input.shape,
        lam=m.training.lam,
        test_error=m.metrics.test_error,
        specialists=bool(m.specialists),
        providers=engine.providers,
        executor=engine.executor,
        executor_note=engine.packed_note,
    )
