"""/admin/*: the server-wide fault plan, for robustness rehearsals. Bearer-token protected.

No token configured (QUORUM_ADMIN_TOKEN unset): every /admin route is 404. A token configured:
no `Authorization: Bearer …` is 401, a wrong one 403 (compared in constant time).
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request

from quorum.runtime.faults import FaultPlan
from quorum.server.deps import get_engine, get_settings
from quorum.server.errors import ApiError
from quorum.server.schemas import FaultPlanBody

__all__ = ["fault_plan", "is_admin", "require_admin", "router"]

router = APIRouter(prefix="/admin", tags=["admin"])


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


def _out(plan: FaultPlan | None) -> FaultPlanBody:
    if plan is None:
        return FaultPlanBody()
    return FaultPlanBody(
        fail=sorted(plan.fail),
        nan=sorted(plan.nan),
        delay_ms=plan.delay_ms,
        fail_probability=plan.fail_probability,
        drop_probability=plan.drop_probability,
        seed=plan.seed,
    )


@router.get("/faults", response_model=FaultPlanBody)
async def get_faults(request: Request) -> FaultPlanBody:
    """The server-wide fault plan (empty when none)."""
    require_admin(request)
    return _out(get_engine(request).faults)


@router.put("/faults", response_model=FaultPlanBody)
async def put_faults(request: Request, body: FaultPlanBody) -> FaultPlanBody:
    """Apply a fault plan to every request until it is deleted (or replaced)."""
    require_admin(request)
    engine = get_engine(request)
    plan = body.to_plan()
    plan.check_ids(engine.num_modules)
    engine.faults = plan if plan.active else None
    return _out(engine.faults)


@router.delete("/faults", response_model=FaultPlanBody)
async def delete_faults(request: Request) -> FaultPlanBody:
    """Clear the server-wide fault plan."""
    require_admin(request)
    get_engine(request).faults = None
    return _out(None)
