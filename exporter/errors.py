"""Errors raised by the exporter; each message says how to fix the problem."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(Exception):
    """The run cannot be exported, or an exported graph failed its checks."""
