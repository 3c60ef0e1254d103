"""Errors raised by the exporter; each message says how to fix the problem."""

from __future__ import annotations

from quorum.core.errors import QuorumError

__all__ = ["ExportError"]


class ExportError(QuorumError):
    """The run cannot be exported, or an exported graph failed its checks."""
