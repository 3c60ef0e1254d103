"""Building blocks shared by the convolutional ensembles.

M modules' feature maps live side by side on the channel axis, module-major: channels
[j*C, (j+1)*C) belong to module j. A convolution with `groups=M` then applies each module's
own filters to its own channels only, and a BatchNorm over M*C channels normalizes each
module's channels with its own statistics. The first layer sees one shared input, so it is a
plain convolution with M*C output channels: the same as M convolutions of C channels.

Cutting module j out (`conv_of`, `bn_of`, `head_of`) gives standalone layers with the same
weights. For inference, a BatchNorm that follows a convolution is folded into it
(`fold_bn`); one that follows a concatenation (DenseNet's pre-activation) becomes a
per-channel scale and shift (`Affine`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Affine", "BatchedHead", "bn_of", "conv_of", "fold_bn", "head_of"]


class BatchedHead(nn.Module):
    """M linear heads as one batched matmul: (B, M, F) -> (B, M, K), each initialized as
    `nn.Linear(F, K)` would be."""

    def __init__(self, num_modules: int, features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_modules, features, num_classes))
        self.bias = nn.Parameter(torch.empty(num_modules, num_classes))
        bound = 1.0 / math.sqrt(features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # (M, B, F) @ (M, F, K) -> (M, B, K): one batched matmul for every module
        return torch.baddbmm(self.bias.unsqueeze(1), h.transpose(0, 1), self.weight).transpose(0, 1)


class Affine(nn.Module):
    """x * scale[c] + shift[c]: an eval-mode BatchNorm that cannot be folded into a convolution."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone().view(1, -1, 1, 1))
        self.shift = nn.Parameter(shift.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _bn_affine(bn: nn.BatchNorm2d, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as scale and shift, for channels `rows`."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight[rows] / torch.sqrt(bn.running_var[rows] + bn.eps)
    return scale, bn.bias[rows] - bn.running_mean[rows] * scale


@torch.no_grad()
def conv_of(conv: nn.Conv2d, j: int, num_modules: int) -> nn.Conv2d:
    """Module j's part of a batched convolution (its output channels), as a standalone Conv2d."""
    out = conv.out_channels // num_modules
    in_ch = conv.weight.shape[1]  # per group: a module's own channels, or the shared input's
    c = nn.Conv2d(in_ch, out, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)  # type: ignore[arg-type]
    rows = slice(j * out, (j + 1) * out)
    c.weight.copy_(conv.weight[rows])
    if conv.bias is not None and c.bias is not None:
        c.bias.copy_(conv.bias[rows])
    return c


@torch.no_grad()
def bn_of(bn: nn.BatchNorm2d, j: int, num_modules: int) -> Affine:
    """Module j's channels of a batched BatchNorm, as the eval-mode scale and shift."""
    c = bn.num_features // num_modules
    return Affine(*_bn_affine(bn, slice(j * c, (j + 1) * c)))


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, j: int, num_modules: int) -> nn.Conv2d:
    """Module j's convolution followed by its BatchNorm (eval mode), as one Conv2d."""
    c = conv_of(conv, j, num_modules)
    scale, shift = _bn_affine(bn, slice(j * c.out_channels, (j + 1) * c.out_channels))
    bias = c.bias if c.bias is not None else torch.zeros_like(scale)
    folded = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=True)  # type: ignore[arg-type]
    folded.weight.copy_(c.weight * scale.view(-1, 1, 1, 1))
    assert folded.bias is not None
    folded.bias.copy_(bias * scale + shift)
    return folded


@torch.no_grad()
def head_of(head: BatchedHead, j: int) -> nn.Linear:
    """Module j's head as a standalone nn.Linear."""
    features, classes = head.weight.shape[1:]
    lin = nn.Linear(features, classes)
    lin.weight.copy_(head.weight[j].T)
    lin.bias.copy_(head.bias[j])
    return lin
