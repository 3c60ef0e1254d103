"""Errors raised by the trainer; each message says how to fix the problem."""

from __future__ import annotations

from quorum.core.errors import DataError, QuorumError

__all__ = ["ConfigError", "DataError", "PeerLost", "RunDirError", "TrainerError"]


class TrainerError(QuorumError):
    """Base class for every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A training option is out of range or inconsistent."""


class RunDirError(TrainerError):
    """The run directory is in a state that the requested action cannot use."""


class PeerLost(TrainerError):
    """Module-parallel training: a collective failed because another rank died or stopped answering."""
