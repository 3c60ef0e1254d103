"""Fully convolutional ensembles: `convnet` (M ConvNets) and `treenet` (a shared trunk, then M branches).

Each layer is a 3x3 convolution, BatchNorm and ReLU; then global average pooling and a
linear head (the papers' ConvNets: joint-training paper Table 3, supplement Table 2). All M
modules run as one model: grouped convolutions (`groups=M`), BatchNorm over M*C channels,
one batched matmul for the heads.

A TreeNet (Lee et al. §5) shares its first `split` layers among the modules: those run once,
and the branches start from the trunk's features. Module j of a TreeNet is the trunk plus
branch j; the exporter writes the trunk as its own graph so that the runtime runs it once
per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models._conv import BatchedHead, fold_bn, head_of
from quorum.trainer.models._registry import Ensemble, register

__all__ = ["CONVNET_PRESETS", "BatchedConvNet", "parse_ints"]

# name: (filters, strides, padding). "cifar10" is the joint-training paper's Table 3 (valid
# convolutions); c3..c7 are the supplement's Table 2 (CIFAR-100), whose stride-2 layers are
# marked only in the 6-layer row of our copy: c7 repeats that row's strides.
CONVNET_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "cifar10": ((32, 64, 64, 128, 128), (1, 2, 1, 2, 1), 0),
    "c3": ((32, 64, 64), (1, 1, 1), 1),
    "c4": ((32, 64, 64, 128), (1, 1, 1, 1), 1),
    "c5": ((32, 64, 64, 128, 128), (1, 1, 1, 1, 1), 1),
    "c6": ((32, 64, 64, 128, 128, 256), (1, 1, 2, 1, 1, 2), 1),
    "c7": ((32, 64, 64, 128, 128, 256, 256), (1, 1, 2, 1, 1, 2, 1), 1),
}


def parse_ints(text: str | tuple[int, ...] | list[int], what: str) -> tuple[int, ...]:
    """'32,64,64' -> (32, 64, 64); ConfigError naming `what` if it is not a list of positive ints."""
    if isinstance(text, tuple | list):
        values = tuple(int(v) for v in text)
    else:
        try:
            values = tuple(int(v) for v in str(text).split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--{what} must be comma-separated integers, e.g. 32,64,64; got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--{what} needs at least one value, all >= 1; got {text!r}")
    return values


def resolve_convnet(
    filters: str, strides: str | None, padding: int | None
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Filters, strides and padding from a preset name or explicit lists (strides default to 1)."""
    if filters in CONVNET_PRESETS:
        f, s, p = CONVNET_PRESETS[filters]
        return f, (parse_ints(strides, "strides") if strides else s), (p if padding is None else padding)
    f = parse_ints(filters, "filters")
    s = parse_ints(strides, "strides") if strides else (1,) * len(f)
    if len(s) != len(f):
        raise ConfigError(f"--strides needs one value per layer ({len(f)}), got {len(s)}")
    return f, s, 1 if padding is None else padding


class BatchedConvNet(Ensemble):
    """M ConvNets (or one TreeNet of M branches) as one model.

    Args:
        num_modules: M.
        in_shape: (C, H, W) of one input.
        num_classes: K.
        filters: output channels of each 3x3 convolution, e.g. "32,64,64", or a preset name
            (CONVNET_PRESETS).
        strides: stride of each layer, e.g. "1,2,1" (default: the preset's, else all 1).
        padding: zero padding of every convolution (default: the preset's, else 1).
        split: layers shared by all modules (a TreeNet's trunk); 0 for independent modules.
    """

    def __init__(
        self,
        num_modules: int,
        in_shape: tuple[int, ...],
        num_classes: int = 10,
        filters: str = "cifar10",
        strides: str | None = None,
        padding: int | None = None,
        split: int = 0,
    ):
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(f"convolutional modules take (C, H, W) inputs, got shape {tuple(in_shape)}")
        f, s, p = resolve_convnet(filters, strides, padding)
        if not 0 <= split < len(f):
            raise ConfigError(f"--split must lie in 0..{len(f) - 1} (layers shared by all branches), got {split}")
        if num_modules < 1 or num_classes < 2:
            raise ConfigError(f"needs modules >= 1 and classes >= 2; got {num_modules}, {num_classes}")
        self.num_modules, self.num_classes, self.in_shape = num_modules, num_classes, tuple(in_shape)
        self.filters, self.strides, self.padding, self.split = f, s, p, split
        M = num_modules
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        c_in, h, w = in_shape
        self._layer_flops: list[int] = []
        for i, (out, stride) in enumerate(zip(f, s, strict=True)):
            shared = i < split
            if i < split:  # trunk: one copy
                conv = nn.Conv2d(c_in, out, 3, stride, p, bias=False)
            elif i == split:  # the first per-module layer reads a shared input (image or trunk)
                conv = nn.Conv2d(c_in, M * out, 3, stride, p, bias=False)
            else:
                conv = nn.Conv2d(M * c_in, M * out, 3, stride, p, groups=M, bias=False)
            self.convs.append(conv)
            self.bns.append(nn.BatchNorm2d(out if shared else M * out))
            h, w = (h + 2 * p - 3) // stride + 1, (w + 2 * p - 3) // stride + 1
            if h < 1 or w < 1:
                raise ConfigError(f"layer {i + 1} of {f} leaves no spatial extent for inputs {tuple(in_shape)}")
            self._layer_flops.append(2 * 9 * c_in * out * h * w)
            c_in = out
        self.head = BatchedHead(M, c_in, num_classes)
        self._features = c_in

    def _pairs(self, start: int, stop: int) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return list(zip(self.convs[start:stop], self.bns[start:stop], strict=True))  # type: ignore[arg-type]

    def _layers(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for conv, bn in self._pairs(start, stop):
            x = torch.relu(bn(conv(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = self._layers(x.reshape(B, *self.in_shape), 0, len(self.convs))  # (B, M*F, H', W')
        h = h.mean(dim=(2, 3)).view(B, self.num_modules, self._features)  # global average pooling
        return self.head(h)  # (B, M, K)

    @torch.no_grad()
    def trunk(self) -> nn.Module | None:
        if not self.split:
            return None
        layers: list[nn.Module] = []
        for conv, bn in self._pairs(0, self.split):
            layers += [fold_bn(conv, bn, 0, 1), nn.ReLU()]
        return nn.Sequential(*layers).to(self.head.weight.device).eval()

    @torch.no_grad()
    def branch(self, j: int) -> nn.Module:
        self._check(j)
        layers: list[nn.Module] = []
        for conv, bn in self._pairs(self.split, len(self.convs)):
            layers += [fold_bn(conv, bn, j, self.num_modules), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), head_of(self.head, j)]
        return nn.Sequential(*layers).to(self.head.weight.device).eval()

    def module_flops(self) -> int:
        return sum(self._layer_flops[self.split :]) + 2 * self._features * self.num_classes

    def trunk_flops(self) -> int:
        return sum(self._layer_flops[: self.split])

    def module_params(self) -> int:
        return sum(p.numel() for p in self.branch(0).parameters())

    def arch_name(self) -> str:
        kind = f"TreeNet split {self.split}" if self.split else "ConvNet"
        return f"{self.num_modules}-M {kind} {','.join(map(str, self.filters))}"


def _label(arch: str) -> Callable[[int, Mapping[str, Any]], str]:
    """The name of a run, e.g. 16-M-convnet-16.32.32-s2.2.1 or 8-M-treenet-8.16-split1."""

    def label(m: int, o: Mapping[str, Any]) -> str:
        strides = f"-s{o['strides'].replace(',', '.')}" if o.get("strides") else ""
        split = f"-split{o['split']}" if o.get("split") else ""
        return f"{m}-M-{arch}-{o['filters'].replace(',', '.')}{strides}{split}"

    return label


@register("convnet", options=("filters", "strides", "padding"), label=_label("convnet"), image_input=True)
def convnet(**kwargs: Any) -> BatchedConvNet:
    kwargs.pop("split", None)
    return BatchedConvNet(**kwargs)


@register("treenet", options=("filters", "strides", "padding", "split"), label=_label("treenet"), image_input=True)
def treenet(**kwargs: Any) -> BatchedConvNet:
    if not kwargs.get("split"):
        layers = len(resolve_convnet(kwargs.get("filters", "cifar10"), kwargs.get("strides"), None)[0])
        kwargs["split"] = max(1, math.ceil(layers / 2) - 1)  # default: about the first half shared
    return BatchedConvNet(**kwargs)
