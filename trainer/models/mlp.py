"""M MLPs as one batched model: one hidden layer (the papers' n-M-h-H configurations), or
2 to 4 hidden layers (`hidden="64,64"`: the permAVG thesis's 3- to 5-layer submodels).

Layer 1 of every module is one matmul 784 -> M*H; layer 2 is one batched matmul over
(M, H, K). No Python loop over modules in `forward`.

Activations are laid out module-major, (M, H, B) then (M, K, B), so that both matmuls and
their gradients run on contiguous operands (a batch-major layout sent torch's CPU bmm
backward down a slow per-module path: half the epoch time; see docs/RESULTS.md). `forward`
returns a (B, M, K) view of the (M, K, B) logits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models._registry import Ensemble, register

__all__ = ["BatchedMLP", "DeepBatchedMLP", "mlp", "mlp_widths"]

MAX_HIDDEN_LAYERS = 4


def mlp_widths(hidden: int | str) -> tuple[int, ...]:
    """Units of each hidden layer: `4` or `"4"` is one layer of 4, `"64,32"` two layers."""
    try:
        widths = tuple(int(w) for w in str(hidden).split(","))
    except ValueError:
        raise ConfigError(f"--hidden takes units per hidden layer, e.g. 4 or 64,64; got {hidden!r}") from None
    if not 1 <= len(widths) <= MAX_HIDDEN_LAYERS or min(widths) < 1:
        raise ConfigError(f"--hidden takes 1 to {MAX_HIDDEN_LAYERS} widths >= 1, e.g. 4 or 64,64; got {hidden!r}")
    return widths


def _label(m: int, options: Mapping[str, Any]) -> str:
    return f"{m}-M-{'.'.join(map(str, mlp_widths(options['hidden'])))}-H"  # 256-M-4-H, 6-M-64.64-H


def _packable(options: Mapping[str, Any]) -> bool:
    return len(mlp_widths(options["hidden"])) == 1  # the packed graph knows Gemm-Relu-Gemm modules only


@register("mlp", options=("hidden",), label=_label, packable=_packable, lr_per_module=0.02)
def mlp(
    num_modules: int, hidden: int | str, in_shape: tuple[int, ...] = (784,), num_classes: int = 10
) -> BatchedMLP | DeepBatchedMLP:
    """M MLPs of one hidden layer (`hidden=4`) or of several (`hidden="64,64"`)."""
    widths = mlp_widths(hidden)
    if len(widths) == 1:
        return BatchedMLP(num_modules, widths[0], in_shape, num_classes)
    return DeepBatchedMLP(num_modules, widths, in_shape, num_classes)


class BatchedMLP(Ensemble):
    """M modules of `in -> hidden (ReLU) -> classes`, initialized as M `nn.Linear` pairs would be.

    Args:
        num_modules: M, the number of modules.
        hidden: H, hidden units per module.
        in_shape: shape of one input; flattened to `in_features`.
        num_classes: K classes, or D regression/count outputs.
    """

    def __init__(self, num_modules: int, hidden: int, in_shape: tuple[int, ...] = (784,), num_classes: int = 10):
        super().__init__()
        if num_modules < 1 or hidden < 1 or num_classes < 1:
            raise ConfigError(
                f"mlp needs modules >= 1, hidden >= 1, outputs >= 1; got {num_modules}, {hidden}, {num_classes}"
            )
        self.num_modules = num_modules
        self.hidden = hidden
        self.num_classes = num_classes
        self.in_shape = tuple(in_shape)
        self.in_features = math.prod(self.in_shape)
        # fc1's fan-in is the same for the stacked layer as for one module, so nn.Linear's
        # default init is exactly each module's own init.
        self.fc1 = nn.Linear(self.in_features, num_modules * hidden)
        self.w2 = nn.Parameter(torch.empty(num_modules, hidden, num_classes))
        self.b2 = nn.Parameter(torch.empty(num_modules, num_classes))
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear(hidden, K) default: U(-1/sqrt(fan_in), +)
        nn.init.uniform_(self.w2, -bound, bound)
        nn.init.uniform_(self.b2, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x2d = x.reshape(B, self.in_features)
        h = torch.relu(torch.addmm(self.fc1.bias.unsqueeze(1), self.fc1.weight, x2d.t()))  # (M*H, B)
        h = h.view(self.num_modules, self.hidden, B)  # (M, H, B)
        logits = torch.baddbmm(self.b2.unsqueeze(2), self.w2.transpose(1, 2), h)  # (M, K, B)
        return logits.permute(2, 0, 1)  # (B, M, K)

    @torch.no_grad()
    def branch(self, j: int) -> nn.Module:
        self._check(j)
        H = self.hidden
        l1 = nn.Linear(self.in_features, H)
        l2 = nn.Linear(H, self.num_classes)
        l1.weight.copy_(self.fc1.weight[j * H : (j + 1) * H])
        l1.bias.copy_(self.fc1.bias[j * H : (j + 1) * H])
        l2.weight.copy_(self.w2[j].T)
        l2.bias.copy_(self.b2[j])
        flatten = nn.Flatten() if len(self.in_shape) > 1 else nn.Identity()
        return nn.Sequential(flatten, l1, nn.ReLU(), l2).to(self.w2.device).eval()

    def output_bias(self) -> torch.Tensor:
        """The output layer's biases (M, K)."""
        return self.b2

    def module_flops(self) -> int:
        return 2 * (self.in_features * self.hidden + self.hidden * self.num_classes)

    def arch_name(self) -> str:
        return f"{self.num_modules}-M-{self.hidden}-H"

    def module_params(self) -> int:
        return (self.in_features + 1) * self.hidden + (self.hidden + 1) * self.num_classes


class DeepBatchedMLP(Ensemble):
    """M modules of `in -> widths[0] -> ... -> widths[-1] (ReLU after each) -> classes`.

    Layer 1 is one matmul 784 -> M*H1 (as in `BatchedMLP`); every later layer i is one batched
    matmul over (M, H_{i-1}, H_i) with weights `w{i}` and biases `b{i}`, the last one giving the
    logits. Initialized as M stacks of `nn.Linear` would be.
    """

    def __init__(
        self, num_modules: int, widths: tuple[int, ...], in_shape: tuple[int, ...] = (784,), num_classes: int = 10
    ):
        super().__init__()
        if num_modules < 1 or num_classes < 1 or len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"mlp needs modules >= 1, 2+ widths >= 1, outputs >= 1; got {num_modules}, {widths}")
        self.num_modules = num_modules
        self.widths = tuple(widths)
        self.num_classes = num_classes
        self.in_shape = tuple(in_shape)
        self.in_features = math.prod(self.in_shape)
        self.fc1 = nn.Linear(self.in_features, num_modules * widths[0])
        dims = (*widths, num_classes)
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims), start=2):
            w = nn.Parameter(torch.empty(num_modules, fan_in, fan_out))
            b = nn.Parameter(torch.empty(num_modules, fan_out))
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default: U(-1/sqrt(fan_in), +)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
            self.register_parameter(f"w{i}", w)
            self.register_parameter(f"b{i}", b)

    @property
    def num_layers(self) -> int:
        """Dense layers per module (hidden layers + the output layer)."""
        return len(self.widths) + 1

    def _layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_parameter(f"w{i}"), self.get_parameter(f"b{i}")  # (M, H_{i-1}, H_i), (M, H_i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x2d = x.reshape(B, self.in_features)
        h = torch.addmm(self.fc1.bias.unsqueeze(1), self.fc1.weight, x2d.t())  # (M*H1, B)
        h = h.view(self.num_modules, self.widths[0], B)  # (M, H1, B)
        for i in range(2, self.num_layers + 1):
            w, b = self._layer(i)
            h = torch.baddbmm(b.unsqueeze(2), w.transpose(1, 2), torch.relu(h))  # (M, H_i, B)
        return h.permute(2, 0, 1)  # (B, M, K)

    @torch.no_grad()
    def branch(self, j: int) -> nn.Module:
        self._check(j)
        H = self.widths[0]
        first = nn.Linear(self.in_features, H)
        first.weight.copy_(self.fc1.weight[j * H : (j + 1) * H])
        first.bias.copy_(self.fc1.bias[j * H : (j + 1) * H])
        layers: list[nn.Module] = [nn.Flatten() if len(self.in_shape) > 1 else nn.Identity(), first]
        for i in range(2, self.num_layers + 1):
            w, b = self._layer(i)
            linear = nn.Linear(w.shape[1], w.shape[2])
            linear.weight.copy_(w[j].T)
            linear.bias.copy_(b[j])
            layers += [nn.ReLU(), linear]
        return nn.Sequential(*layers).to(self.fc1.weight.device).eval()

    def output_bias(self) -> torch.Tensor:
        """The output layer's biases (M, K)."""
        return self._layer(self.num_layers)[1]

    def module_flops(self) -> int:
        dims = (self.in_features, *self.widths, self.num_classes)
        return 2 * sum(a * b for a, b in itertools.pairwise(dims))

    def module_params(self) -> int:
        dims = (self.in_features, *self.widths, self.num_classes)
        return sum((a + 1) * b for a, b in itertools.pairwise(dims))

    def arch_name(self) -> str:
        return f"{self.num_modules}-M-{'.'.join(map(str, self.widths))}-H"
