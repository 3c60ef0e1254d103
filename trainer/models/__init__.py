"""Batched ensemble architectures, reached through the registry."""

from __future__ import annotations

from quorum.trainer.models import mlp as _mlp  # noqa: F401  (registers "mlp")
from quorum.trainer.models._registry import Ensemble, create, list_archs, register

__all__ = ["Ensemble", "create", "list_archs", "register"]
