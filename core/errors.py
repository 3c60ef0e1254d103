"""The base of every error Quorum raises on purpose; each layer's `errors.py` derives from it.

A `QuorumError` carries a message for the user that says how to fix the problem; the CLI
prints it, and the server maps each subclass to an HTTP status in one place.
"""

from __future__ import annotations

__all__ = ["DataError", "QuorumError"]


class QuorumError(Exception):
    """Base class of every error with a message for the user."""


class DataError(QuorumError):
    """A dataset is missing or malformed."""
