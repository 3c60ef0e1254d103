"""/admin/*: the server-wide fault plan (robustness rehearsals) and hot reload; behind the admin
token (`quorum.server.auth`): 404 when none is configured, 401 without it, 403 when wrong."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request

from quorum.runtime.errors import QuorumError
from quorum.server.auth import require_admin
from quorum.server.deps import get_engine, get_settings
from quorum.server.errors import ApiError
from quorum.server.reload import ReloadRefused, swap_engine
from quorum.server.schemas import FaultPlanBody, ReloadBody, ReloadResult

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["router"]


async def _guard(request: Request) -> None:  # async: not sent to the thread pool
    require_admin(request)


# The guard runs before the body is read: without the right token, a malformed body is not a 422.
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_guard)])


@router.get("/faults", response_model=FaultPlanBody)
async def get_faults(request: Request) -> FaultPlanBody:
    """The server-wide fault plan (empty when none)."""
    return FaultPlanBody.from_plan(get_engine(request).faults)


@router.put("/faults", response_model=FaultPlanBody)
async def put_faults(request: Request, body: FaultPlanBody) -> FaultPlanBody:
    """Apply a fault plan to every request until it is deleted (or replaced)."""
    engine = get_engine(request)
    plan = body.to_plan()
    plan.check_ids(engine.num_modules)
    engine.faults = plan if plan.active else None
    return FaultPlanBody.from_plan(engine.faults)


@router.delete("/faults", response_model=FaultPlanBody)
async def delete_faults(request: Request) -> FaultPlanBody:
    """Clear the server-wide fault plan."""
    get_engine(request).faults = None
    return FaultPlanBody.from_plan(None)


@router.post(
    "/reload",
    response_model=ReloadResult,
    responses={
        403: {"description": "The bundle lies outside QUORUM_BUNDLE_ROOT."},
        409: {"description": "The bundle would serve with less than the one serving (reload with force)."},
        422: {"description": "The new bundle cannot be served."},
    },
)
async def reload(request: Request, body: ReloadBody | None = None) -> ReloadResult:
    """Load a bundle (by default the configured one, again) and swap it in atomically.

    The new engine is loaded and verified off the event loop while the old one keeps serving;
    requests already running finish on the old engine, which is closed when the last of them
    ends. A bundle with quarantined modules, or fewer healthy modules than the one serving,
    changes nothing unless `force` is given; one that cannot be served changes nothing. SIGHUP
    reloads the configured bundle the same way.
    """
    settings = get_settings(request)
    bundle = Path(body.bundle) if body and body.bundle else settings.bundle
    root = settings.reload_root
    if not bundle.absolute().resolve().is_relative_to(root):
        raise ApiError(403, f"reload loads bundles from under {root} only (QUORUM_BUNDLE_ROOT); not {bundle}")
    old: Engine | None = request.app.state.engine
    serving = f"still serving {old.bundle_dir if old else 'nothing'}"
    try:
        new = await swap_engine(request.app, bundle, force=bool(body and body.force))
    except ReloadRefused as e:
        raise ApiError(409, f"reload refused, {serving}: {e}") from None
    except QuorumError as e:
        raise ApiError(422, f"reload refused, {serving}: {e}") from None
    return ReloadResult(
        bundle=str(new.bundle_dir), name=new.manifest.name, healthy_modules=len(new.healthy_ids), executor=new.executor
    )
