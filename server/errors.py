"""One place that maps errors to HTTP: `{"error": "..."}` with a message saying what was wrong."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable, QuorumError

__all__ = ["ApiError", "describe_validation_errors", "install_error_handlers", "status_of"]

# The HTTP status of each runtime error: the caller's mistake, nothing can answer, the bundle is broken.
STATUS: dict[type[QuorumError], int] = {InvalidRequest: 422, NoModulesAvailable: 503, BundleError: 500}

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error detected in the HTTP layer itself (a limit, an unknown parameter)."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


def status_of(exc: QuorumError) -> int:
    """The HTTP status of a runtime error: that of its nearest class in STATUS, else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """FastAPI/pydantic validation errors as one readable sentence."""
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
        kind = loc[0] if loc else "request"
        msg = err.get("msg", "invalid")
        parts.append(f"{kind} {where}: {msg}" if where else f"{kind}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QuorumError)
    async def _domain(_: Request, exc: QuorumError) -> JSONResponse:
        response = _error(status_of(exc), str(exc))
        if isinstance(exc, NoModulesAvailable) and exc.retry_after_s is not None:
            response.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
        return response

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        body_errors = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("body",)]
        if body_errors:
            content_type = request.headers.get("content-type", "")
            media = content_type.split(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                return _error(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
            if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in body_errors):
                return _error(422, 'request body is empty; send JSON like {"inputs": [[...], ...]}')
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = errors[0].get("ctx", {}).get("error", "")
            return _error(400, f"request body is not valid JSON{': ' + str(detail) if detail else ''}")
        return _error(422, describe_validation_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")
