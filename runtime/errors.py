"""Domain errors of the runtime. Each carries the HTTP status a server should answer with,
so that one handler maps them all; the runtime itself knows nothing of HTTP."""

from __future__ import annotations

__all__ = [
    "BundleError",
    "InvalidRequest",
    "NoModulesAvailable",
    "QuorumError",
]


class QuorumError(Exception):
    """Base class. `status_code` is the HTTP status this error maps to."""

    status_code = 500


class InvalidRequest(QuorumError, ValueError):
    """The caller's input or options are wrong: shape, dtype, non-finite values, budget, drop."""

    status_code = 422


class NoModulesAvailable(QuorumError):
    """No module could answer: all quarantined, or every evaluated module failed."""

    status_code = 503


class BundleError(QuorumError):
    """The bundle cannot be served at all: no manifest, an unreadable manifest, no healthy module."""

    status_code = 500
