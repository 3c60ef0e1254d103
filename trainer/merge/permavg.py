"""permAVG (Mitchell, *Efficient Deep Ensembles by Averaging Neural Networks in Parameter Space*,
eq. 25-29 and Algorithm 1): N frozen MLPs averaged in weight space after learned soft permutations.

Every model n > 0 and hidden layer l has a cost matrix C_{l,n}, initialized to the identity, whose
Sinkhorn operator P_{l,n} = S(C_{l,n}/τ) (100 iterations) is a doubly stochastic matrix; model 0 is
the reference (P = I). Layer l of the merged network is

    W̄_l = 1/N Σ_n P_{l,n} W_{l,n} P_{l-1,n}⁻¹,    b̄_l = 1/N Σ_n P_{l,n} b_{l,n}

(P_{0} = I on the inputs, no permutation of the logits), which is Algorithm 1's layer output
1/N Σ_n P_{l,n}(W_{l,n} P_{l-1,n}⁻¹ x + b_{l,n}) computed once per step instead of per input. The
cost matrices are trained on cross-entropy with Adam (lr 0.1) and cosine annealing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quorum.trainer.merge._fit import fit_epochs
from quorum.trainer.merge.layers import Layers, forward
from quorum.trainer.merge.sinkhorn import sinkhorn

__all__ = ["PermAvg", "PermAvgConfig", "permavg"]


@dataclass(frozen=True)
class PermAvgConfig:
    epochs: int = 20  # thesis: 20
    lr: float = 0.1  # Adam, annealed to 0 by a cosine over the epochs (thesis)
    tau: float = 1.0  # Sinkhorn temperature τ (thesis: 1)
    iterations: int = 100  # Sinkhorn iterations (thesis: 100)
    batch_size: int = 100  # the cost matrices' gradient is per batch; the Sinkhorn cost per step
    seed: int = 0  # shuffles


class PermAvg(nn.Module):
    """The permAVG network of frozen MLPs `models` (same shapes): cost matrices are its only parameters."""

    def __init__(self, models: Sequence[Layers], tau: float = 1.0, iterations: int = 100):
        super().__init__()
        if len(models) < 2:
            raise ValueError("permAVG merges two or more models")
        self.tau, self.iterations = tau, iterations
        self.num_models = len(models)
        # frozen stacked weights of each layer: (N, out, in) and (N, out)
        self.weights = [torch.stack([m[i][0] for m in models]) for i in range(len(models[0]))]
        self.biases = [torch.stack([m[i][1] for m in models]) for i in range(len(models[0]))]
        widths = [w.shape[1] for w in self.weights[:-1]]
        self.costs = nn.ParameterList(
            nn.Parameter(torch.eye(h).repeat(self.num_models - 1, 1, 1))
            for h in widths  # (N-1, H_l, H_l)
        )

    def permutations(self) -> list[torch.Tensor]:
        """P_{l,n} of each hidden layer, (N, H_l, H_l): the identity for model 0, Sinkhorn for the rest."""
        soft: dict[int, torch.Tensor] = {}
        for h in {c.shape[-1] for c in self.costs}:  # one Sinkhorn call per width: its cost is per op, not per matrix
            same = [c for c in self.costs if c.shape[-1] == h]
            soft[h] = sinkhorn(torch.cat(list(same)), self.tau, self.iterations)
        perms, used = [], dict.fromkeys(soft, 0)
        for cost in self.costs:
            h, n = cost.shape[-1], cost.shape[0]
            eye = torch.eye(h, dtype=cost.dtype).unsqueeze(0)
            perms.append(torch.cat([eye, soft[h][used[h] : used[h] + n]]))  # (N, H_l, H_l)
            used[h] += n
        return perms

    def merged(self) -> Layers:
        """The averaged network's weights under the current permutations (differentiable)."""
        perms = self.permutations()
        out: Layers = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i > 0:
                w = w @ torch.linalg.inv(perms[i - 1])  # (N, out, in): W P_{l-1}⁻¹
            if i < len(perms):
                w, b = perms[i] @ w, (perms[i] @ b.unsqueeze(-1)).squeeze(-1)  # P_l W, P_l b
            out.append((w.mean(0), b.mean(0)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.merged(), x)


def permavg(
    models: Sequence[Layers], x: torch.Tensor, y: torch.Tensor, config: PermAvgConfig, *, progress: bool = True
) -> Layers:
    """Learn the permutations on (x, y) and return the merged network's weights (detached)."""
    net = PermAvg(models, config.tau, config.iterations)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)

    def step(idx: torch.Tensor) -> float:
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    fit_epochs(step, len(y), epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, desc="permavg",
               progress=progress, end_of_epoch=sched.step)  # fmt: skip
    with torch.no_grad():
        return [(w.detach(), b.detach()) for w, b in net.merged()]
