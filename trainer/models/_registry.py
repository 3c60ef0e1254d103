"""The architecture registry: `register`, `create`, `list_archs`.

Every architecture is one batched model of M same-shaped modules whose `forward` returns
logits (B, M, K), and which can hand out module j as a standalone `nn.Module` for export.
The trainer, the exporter and the tests all iterate over the names registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from quorum.trainer.errors import ConfigError

__all__ = ["Ensemble", "create", "list_archs", "register"]


class Ensemble(nn.Module):
    """Base class of every registered architecture: M same-shaped modules as one model.

    `forward` maps (B, *in_shape) to logits (B, M, K) with no Python loop over modules.
    """

    num_modules: int
    num_classes: int
    in_shape: tuple[int, ...]

    def module(self, j: int) -> nn.Module:
        """Module j alone, as an eval-mode `nn.Module` mapping (B, *in_shape) -> (B, K)."""
        raise NotImplementedError

    def module_flops(self) -> int:
        """Floating-point operations of one module on one input (2 per multiply-add)."""
        raise NotImplementedError

    def module_params(self) -> int:
        """Parameters of one module."""
        raise NotImplementedError


_F = TypeVar("_F", bound=Callable[..., Any])
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[_F], _F]:
    """Class or factory decorator: make an architecture available to `create(name, ...)`."""

    def wrap(factory: _F) -> _F:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_archs() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Ensemble:
    """Build the batched ensemble registered as `name`."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(list_archs())}") from None
    model = factory(**kwargs)
    assert isinstance(model, Ensemble), f"{name} must build an Ensemble"
    return model
