"""Who may do what: the admin token (admin routes, fault injection) checked in one place.

No token configured (QUORUM_ADMIN_TOKEN unset, empty, or shorter than MIN_TOKEN_LENGTH): the
admin routes are 404 and nobody injects faults unless QUORUM_ALLOW_FAULT_INJECTION=true. A token
configured: no `Authorization: Bearer …` is 401, a wrong one 403 (compared in constant time).
"""

from __future__ import annotations

import secrets

from fastapi import Request

from quorum.server.deps import get_settings
from quorum.server.errors import ApiError
from quorum.server.settings import MIN_TOKEN_LENGTH

__all__ = ["is_admin", "may_inject_faults", "require_admin"]


def is_admin(request: Request) -> bool:
    """The request carries the configured admin token."""
    settings = get_settings(request)
    token = settings.admin_token
    if token is None or not settings.admin_enabled:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.get_secret_value().encode())


def require_admin(request: Request) -> None:
    if not get_settings(request).admin_enabled:
        raise ApiError(
            404,
            f"the admin API is disabled: set QUORUM_ADMIN_TOKEN (at least {MIN_TOKEN_LENGTH} characters) to enable it",
        )
    if not request.headers.get("authorization"):
        raise ApiError(401, "the admin API needs `Authorization: Bearer <QUORUM_ADMIN_TOKEN>`")
    if not is_admin(request):
        raise ApiError(403, "wrong admin token")


def may_inject_faults(request: Request) -> bool:
    """Per-request fault injection (fail, nan, delay_ms) is open to this request."""
    return get_settings(request).allow_fault_injection or is_admin(request)
