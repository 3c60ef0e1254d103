"""/admin/*: the server-wide fault plan (robustness rehearsals) and hot reload. Bearer-token protected.

No token configured (QUORUM_ADMIN_TOKEN unset): every /admin route is 404. A token configured:
no `Authorization: Bearer …` is 401, a wrong one 403 (compared in constant time).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from quorum.runtime.engine import Engine
from quorum.runtime.errors import QuorumError
from quorum.runtime.faults import FaultPlan
from quorum.server.deps import get_engine, get_settings
from quorum.server.errors import ApiError
from quorum.server.reload import swap_engine
from quorum.server.schemas import FaultPlanBody, ReloadBody, ReloadResult

__all__ = ["fault_plan", "is_admin", "require_admin", "router"]


def is_admin(request: Request) -> bool:
    """The request carries the configured admin token."""
    token = get_settings(request).admin_token
    if token is None:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.get_secret_value().encode())


def require_admin(request: Request) -> None:
    token = get_settings(request).admin_token
    if token is None:
        raise ApiError(404, "the admin API is disabled: set QUORUM_ADMIN_TOKEN to enable it")
    if not request.headers.get("authorization"):
        raise ApiError(401, "the admin API needs `Authorization: Bearer <QUORUM_ADMIN_TOKEN>`")
    if not is_admin(request):
        raise ApiError(403, "wrong admin token")


async def _guard(request: Request) -> None:  # async: not sent to the thread pool
    require_admin(request)


# The guard runs before the body is read: without the right token, a malformed body is not a 422.
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_guard)])


def fault_plan(
    request: Request, fail: frozenset[int], nan: frozenset[int], delay_ms: float | None, seed: int | None
) -> FaultPlan | None:
    """A per-request fault plan, if the request asks for one and may."""
    if not (fail or nan or delay_ms):
        return None
    if not (get_settings(request).allow_fault_injection or is_admin(request)):
        raise ApiError(
            403, "fault injection (fail, nan, delay_ms) needs the admin token, or QUORUM_ALLOW_FAULT_INJECTION=true"
        )
    return FaultPlan(fail=fail, nan=nan, delay_ms=delay_ms or 0.0, seed=seed)


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
    "/reload", response_model=ReloadResult, responses={422: {"description": "The new bundle cannot be served."}}
)
async def reload(request: Request, body: ReloadBody | None = None) -> ReloadResult:
    """Load a bundle (by default the configured one, again) and swap it in atomically.

    The new engine is loaded and verified off the event loop while the old one keeps serving;
    requests already running finish on the old engine, which holds their reference. If the new
    bundle cannot be served, nothing changes and the answer says why. SIGHUP reloads the
    configured bundle the same way.
    """
    bundle = Path(body.bundle) if body and body.bundle else get_settings(request).bundle
    old: Engine | None = request.app.state.engine
    try:
        new = await swap_engine(request.app, bundle)
    except QuorumError as e:
        raise ApiError(422, f"reload refused, still serving {old.bundle_dir if old else 'nothing'}: {e}") from None
    return ReloadResult(
        bundle=str(new.bundle_dir), name=new.manifest.name, healthy_modules=len(new.healthy_ids), executor=new.executor
    )
