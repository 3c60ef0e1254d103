"""Batched ensemble architectures, reached through the registry."""

from __future__ import annotations

from quorum.trainer.models import convnet as _convnet  # noqa: F401  (registers "convnet", "treenet")
from quorum.trainer.models import densenet as _densenet  # noqa: F401  (registers "densenet_bc")
from quorum.trainer.models import mlp as _mlp  # noqa: F401  (registers "mlp")
from quorum.trainer.models._registry import ArchInfo, Ensemble, arch_info, create, list_archs, register, takes_images

__all__ = ["ArchInfo", "Ensemble", "arch_info", "create", "list_archs", "register", "takes_images"]
