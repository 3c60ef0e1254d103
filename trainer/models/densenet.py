"""M DenseNet-BC networks (Huang et al.) as one model: `densenet_bc`.

A 3x3 stem of 2k channels, three dense blocks of n = (depth - 4) / 6 bottleneck layers
(BN-ReLU-Conv1x1 to 4k, BN-ReLU-Conv3x3 to k, concatenated to the layer's input), transitions
(BN-ReLU-Conv1x1 compressing by 0.5, 2x2 average pooling) between the blocks, then BN-ReLU,
global average pooling and a linear head. The M modules' channels sit side by side,
module-major; every convolution after the stem is grouped (`groups=M`), and a concatenation
interleaves per module so that each module's channels stay contiguous.

Presets are the papers' ensembles (joint-training paper Table 4): DN-100-12-4, DN-82-8-8,
DN-64-6-16 (depth-growth-modules).
"""

from __future__ import annotations

import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models._conv import BatchedHead, bn_of, conv_of, fold_bn, head_of
from quorum.trainer.models._registry import Ensemble, register

__all__ = ["DENSENET_PRESETS", "BatchedDenseNetBC"]

DENSENET_PRESETS: dict[str, tuple[int, int, int]] = {  # name: (depth, growth, modules)
    "DN-100-12-4": (100, 12, 4),
    "DN-82-8-8": (82, 8, 8),
    "DN-64-6-16": (64, 6, 16),
}


def _concat(a: torch.Tensor, b: torch.Tensor, num_modules: int) -> torch.Tensor:
    """Concatenate two module-major feature maps per module: (B, M*Ca, …), (B, M*Cb, …) -> (B, M*(Ca+Cb), …)."""
    B, _, H, W = a.shape
    out = torch.cat([a.view(B, num_modules, -1, H, W), b.view(B, num_modules, -1, H, W)], dim=2)
    return out.view(B, -1, H, W)


class _Bottleneck(nn.Module):
    """One dense layer of M modules: BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), then concatenation."""

    def __init__(self, num_modules: int, channels: int, growth: int):
        super().__init__()
        M, inner = num_modules, 4 * growth
        self.num_modules = M
        self.bn1 = nn.BatchNorm2d(M * channels)
        self.conv1 = nn.Conv2d(M * channels, M * inner, 1, groups=M, bias=False)
        self.bn2 = nn.BatchNorm2d(M * inner)
        self.conv2 = nn.Conv2d(M * inner, M * growth, 3, padding=1, groups=M, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return _concat(x, new, self.num_modules)

    def module(self, j: int) -> nn.Module:
        # bn2 follows conv1 directly: folded into it; bn1 reads a concatenation: scale and shift.
        f = nn.Sequential(
            bn_of(self.bn1, j, self.num_modules),
            nn.ReLU(),
            fold_bn(self.conv1, self.bn2, j, self.num_modules),
            nn.ReLU(),
            conv_of(self.conv2, j, self.num_modules),
        )
        return _DenseLayer(f)


class _DenseLayer(nn.Module):
    """A standalone module's dense layer: its input, concatenated with what `f` adds."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], dim=1)


class _Transition(nn.Module):
    def __init__(self, num_modules: int, channels: int, out: int):
        super().__init__()
        self.num_modules = num_modules
        self.bn = nn.BatchNorm2d(num_modules * channels)
        self.conv = nn.Conv2d(num_modules * channels, num_modules * out, 1, groups=num_modules, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(torch.relu(self.bn(x))))

    def module(self, j: int) -> nn.Module:
        M = self.num_modules
        return nn.Sequential(bn_of(self.bn, j, M), nn.ReLU(), conv_of(self.conv, j, M), nn.AvgPool2d(2))


@register(
    "densenet_bc",
    options=("depth", "growth"),
    label=lambda m, o: f"DN-{o['depth']}-{o['growth']}-{m}",
    image_input=True,
)
class BatchedDenseNetBC(Ensemble):
    """M DenseNet-BC modules.

    Args:
        num_modules: M.
        in_shape: (C, H, W) of one input.
        num_classes: K.
        depth: total depth d; (d - 4) must be divisible by 6 (bottleneck layers per block).
        growth: growth rate k.
        compression: channel factor of the transitions (0.5 in DenseNet-BC).
    """

    def __init__(
        self,
        num_modules: int,
        in_shape: tuple[int, ...],
        num_classes: int = 10,
        depth: int = 100,
        growth: int = 12,
        compression: float = 0.5,
    ):
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(f"convolutional modules take (C, H, W) inputs, got shape {tuple(in_shape)}")
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"--depth must be 6n + 4 with n >= 1 (e.g. 40, 64, 82, 100), got {depth}")
        if growth < 1 or not 0 < compression <= 1 or num_modules < 1 or num_classes < 2:
            raise ConfigError("needs growth >= 1, compression in (0, 1], modules >= 1, classes >= 2")
        M = num_modules
        self.num_modules, self.num_classes, self.in_shape = M, num_classes, tuple(in_shape)
        self.depth, self.growth = depth, growth
        n = (depth - 4) // 6
        c = 2 * growth
        self.stem = nn.Conv2d(in_shape[0], M * c, 3, padding=1, bias=False)  # shared input: not grouped
        stages: list[nn.Module] = []
        for block in range(3):
            for i in range(n):
                stages.append(_Bottleneck(M, c + i * growth, growth))
            c += n * growth
            if block < 2:
                out = int(c * compression)
                stages.append(_Transition(M, c, out))
                c = out
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(M * c)
        self.head = BatchedHead(M, c, num_classes)
        self._features = c
        self._flops: int | None = None  # counted on first use: a probe pass costs seconds on a CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = torch.relu(self.bn(self.stages(self.stem(x.reshape(B, *self.in_shape)))))
        return self.head(h.mean(dim=(2, 3)).view(B, self.num_modules, self._features))

    @torch.no_grad()
    def branch(self, j: int) -> nn.Module:
        self._check(j)
        M = self.num_modules
        layers = [conv_of(self.stem, j, M), *(s.module(j) for s in self.stages)]  # type: ignore[operator]
        layers += [bn_of(self.bn, j, M), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head_of(self.head, j)]
        return nn.Sequential(*layers).to(self.head.weight.device).eval()

    def _count_flops(self) -> int:
        """Multiply-adds x 2 of one module, from the output shapes of one probe pass."""
        flops = 0

        def hook(conv: nn.Module, _: object, out: torch.Tensor) -> None:
            nonlocal flops
            assert isinstance(conv, nn.Conv2d)
            per_out = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            flops += 2 * per_out * out[0].numel() // self.num_modules

        handles = [m.register_forward_hook(hook) for m in self.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            was_training = self.training
            self.eval()
            self(torch.zeros(1, *self.in_shape, device=self.head.weight.device))
            self.train(was_training)
        for h in handles:
            h.remove()
        return flops + 2 * self._features * self.num_classes

    def module_flops(self) -> int:
        if self._flops is None:
            self._flops = self._count_flops()
        return self._flops

    def module_params(self) -> int:
        return sum(p.numel() for p in self.branch(0).parameters())

    def arch_name(self) -> str:
        return f"DN-{self.depth}-{self.growth}-{self.num_modules}"
