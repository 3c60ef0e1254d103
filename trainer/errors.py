"""Errors raised by the trainer; each message says how to fix the problem."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "RunDirError", "TrainerError"]


class TrainerError(Exception):
    """Base class for every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A training option is out of range or inconsistent."""


class DataError(TrainerError):
    """The dataset is missing or malformed."""


class RunDirError(TrainerError):
    """The run directory is in a state that the requested action cannot use."""
