"""The architecture registry: `register`, `create`, `list_archs`, `arch_info`.

Every architecture is one batched model of M same-shaped modules whose `forward` returns
logits (B, M, K), and which can hand out module j as a standalone `nn.Module` for export.
The trainer, the exporter and the tests all iterate over the names registered here, and ask
`arch_info(name)` what an architecture can do (its options, default rate, packed graph)
instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from quorum.trainer.errors import ConfigError

__all__ = ["ArchInfo", "Ensemble", "arch_info", "create", "list_archs", "register", "takes_images"]


class Ensemble(nn.Module):
    """Base class of every registered architecture: M same-shaped modules as one model.

    `forward` maps (B, *in_shape) to logits (B, M, K) with no Python loop over modules. A
    model whose modules share their first layers (a TreeNet) returns them from `trunk`; module
    j is then `trunk` followed by `branch(j)`.
    """

    num_modules: int
    num_classes: int
    in_shape: tuple[int, ...]

    def trunk(self) -> nn.Module | None:
        """The layers all modules share, eval mode, or None."""
        return None

    def branch(self, j: int) -> nn.Module:
        """Module j after the trunk, as an eval-mode `nn.Module` (its own weights, copied)."""
        raise NotImplementedError

    def module(self, j: int) -> nn.Module:
        """Module j alone, as an eval-mode `nn.Module` mapping (B, *in_shape) -> (B, K)."""
        trunk, branch = self.trunk(), self.branch(j)
        return branch if trunk is None else nn.Sequential(trunk, branch).eval()

    def module_flops(self) -> int:
        """Floating-point operations of one module (its branch) on one input (2 per multiply-add)."""
        raise NotImplementedError

    def trunk_flops(self) -> int:
        """Floating-point operations of the shared trunk on one input (0 without one)."""
        return 0

    def module_params(self) -> int:
        """Parameters of one module (its branch)."""
        raise NotImplementedError

    def arch_name(self) -> str:
        """A short name in the papers' style, e.g. 256-M-4-H or DN-64-6-16."""
        return f"{self.num_modules}-M {type(self).__name__}"

    def _check(self, j: int) -> None:
        if not 0 <= j < self.num_modules:
            raise IndexError(f"module {j} out of range 0..{self.num_modules - 1}")


@dataclass(frozen=True)
class ArchInfo:
    """What an architecture can do, for the trainer, the exporter and the CLI."""

    name: str
    factory: Callable[..., Any]
    options: tuple[str, ...]  # TrainConfig fields it takes: create()'s keywords, the manifest's arch_params
    label: Callable[[int, Mapping[str, Any]], str]  # the papers' name from M and its options, e.g. 256-M-4-H
    image_input: bool = False  # its modules take (C, H, W) images, not flat vectors
    # whether the exporter writes the packed graph (every module in one graph), from the options
    packable: Callable[[Mapping[str, Any]], bool] = lambda options: False
    lr_per_module: float = 0.1  # default SGD rate per module: the rate scales with M (eq. 8's 1/M)


_F = TypeVar("_F", bound=Callable[..., Any])
_REGISTRY: dict[str, ArchInfo] = {}


def register(
    name: str,
    *,
    options: tuple[str, ...],
    label: Callable[[int, Mapping[str, Any]], str],
    image_input: bool = False,
    packable: bool | Callable[[Mapping[str, Any]], bool] = False,
    lr_per_module: float = 0.1,
) -> Callable[[_F], _F]:
    """Class or factory decorator: make an architecture available to `create(name, ...)`; the
    keywords are its `ArchInfo`."""

    def wrap(factory: _F) -> _F:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        packs = packable if callable(packable) else (lambda options, packs=packable: packs)
        _REGISTRY[name] = ArchInfo(name, factory, options, label, image_input, packs, lr_per_module)
        return factory

    return wrap


def arch_info(name: str) -> ArchInfo:
    """What architecture `name` can do; ConfigError names the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(list_archs())}") from None


def takes_images(name: str) -> bool:
    """Whether architecture `name` takes (C, H, W) images rather than flat vectors."""
    return arch_info(name).image_input


def list_archs() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Ensemble:
    """Build the batched ensemble registered as `name`."""
    model = arch_info(name).factory(**kwargs)
    assert isinstance(model, Ensemble), f"{name} must build an Ensemble"
    return model
