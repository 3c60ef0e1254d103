"""An MLP as plain weights: `Layers` = [(W (out, in), b (out,)), ...], ReLU between layers.

The one representation every merge method reads and writes; `member_layers` takes it out of a
batched ensemble, `as_module` turns it into the `nn.Sequential` the exporter writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models import Ensemble

__all__ = ["Layers", "as_module", "average", "forward", "member_layers"]

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def member_layers(model: Ensemble, j: int) -> Layers:
    """Module j of an MLP ensemble as detached float32 weights; ConfigError for other architectures."""
    parts = list(model.module(j).modules())
    linears = [m for m in parts if isinstance(m, nn.Linear)]
    others = [m for m in parts if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    if not linears or others:
        raise ConfigError(f"merging knows MLP modules only (--arch mlp); this ensemble is {model.arch_name()}")
    return [(m.weight.detach().float().clone(), m.bias.detach().float().clone()) for m in linears]


def forward(layers: Layers, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of the MLP `layers` on flat inputs x (B, D)."""
    h = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(layers):
        h = torch.addmm(b, h, w.t())
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def average(models: Sequence[Layers]) -> Layers:
    """Naive averaging: the element-wise mean of same-shaped MLPs' weights."""
    return [
        (torch.stack([m[i][0] for m in models]).mean(0), torch.stack([m[i][1] for m in models]).mean(0))
        for i in range(len(models[0]))
    ]


def as_module(layers: Layers, in_shape: tuple[int, ...]) -> nn.Sequential:
    """The MLP as an eval-mode `nn.Sequential` taking (B, *in_shape), as the ensemble's modules do."""
    mods: list[nn.Module] = [nn.Flatten() if len(in_shape) > 1 else nn.Identity()]
    for i, (w, b) in enumerate(layers):
        linear = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        mods += [linear] if i == len(layers) - 1 else [linear, nn.ReLU()]
    return nn.Sequential(*mods).eval()
