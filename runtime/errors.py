"""Domain errors of the runtime; each message says what was wrong and how to fix it.

The runtime knows nothing of HTTP: the server maps each class to a status code in one place
(`quorum.server.errors`).
"""

from __future__ import annotations

from quorum.core.errors import QuorumError

__all__ = [
    "BundleError",
    "InvalidRequest",
    "NoModulesAvailable",
    "QuorumError",
]


class InvalidRequest(QuorumError, ValueError):
    """The caller's input or options are wrong: shape, dtype, non-finite values, budget, drop."""


class NoModulesAvailable(QuorumError):
    """No module could answer: all quarantined or out of rotation, or every evaluated module failed.

    `retry_after_s`: when modules are expected back (their breakers half-open), in seconds."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BundleError(QuorumError):
    """The bundle cannot be served at all: no manifest, an unreadable manifest, no healthy module."""
