"""M one-hidden-layer MLPs as one batched model (the papers' n-M-h-H configurations).

Layer 1 of every module is one matmul 784 -> M*H; layer 2 is one batched matmul over
(M, H, K). No Python loop over modules in `forward`.

Activations are laid out module-major, (M, H, B) then (M, K, B), so that both matmuls and
their gradients run on contiguous operands (a batch-major layout sent torch's CPU bmm
backward down a slow per-module path: half the epoch time; see docs/RESULTS.md). `forward`
returns a (B, M, K) view of the (M, K, B) logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models._registry import Ensemble, register

__all__ = ["BatchedMLP"]


@register("mlp", options=("hidden",), label=lambda m, o: f"{m}-M-{o['hidden']}-H", packable=True, lr_per_module=0.02)
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

    def module_flops(self) -> int:
        return 2 * (self.in_features * self.hidden + self.hidden * self.num_classes)

    def arch_name(self) -> str:
        return f"{self.num_modules}-M-{self.hidden}-H"

    def module_params(self) -> int:
        return (self.in_features + 1) * self.hidden + (self.hidden + 1) * self.num_classes
