"""Knowledge distillation of an ensemble into one MLP (permAVG thesis eq. 15, after Hinton et al.):

    loss = (1 - α) CE(p_s(1), y) + α τ² KL(p_t(τ) ‖ p_s(τ))

with the teacher's distribution p_t the ensemble's combined prediction (mean of logits, softmax)
and the student a freshly initialized network of one member's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quorum.trainer.merge.layers import Layers

__all__ = ["DistillConfig", "distill"]


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 10  # as the members were trained
    alpha: float = 0.9  # weight of the soft targets (thesis: 0.9)
    temperature: float = 4.0  # softmax temperature τ of both sides (thesis: 3 to 5 are usual)
    lr: float = 0.02  # SGD, momentum 0.9: the rate each MLP module trains at in `quorum train`
    batch_size: int = 100
    seed: int = 0  # the student's initialization and the shuffles


def distill(
    shape: Layers,
    teacher_logits: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    config: DistillConfig,
    *,
    progress: bool = True,
) -> Layers:
    """Train a student of the shape of `shape` (an MLP's weights) on (x, y) and the teacher's logits (N, K)."""
    torch.manual_seed(config.seed)
    linears = [nn.Linear(w.shape[1], w.shape[0]) for w, _ in shape]
    mods: list[nn.Module] = []
    for i, linear in enumerate(linears):
        mods += [linear] if i == len(linears) - 1 else [linear, nn.ReLU()]
    student = nn.Sequential(*mods)
    opt = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9)
    T, a = config.temperature, config.alpha
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.epochs), desc="distill", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), config.batch_size):
            idx = order[i : i + config.batch_size]
            z = student(x[idx].reshape(len(idx), -1))  # (B, K)
            soft = nn.functional.kl_div(
                torch.log_softmax(z / T, dim=1),
                torch.log_softmax(teacher_logits[idx] / T, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            loss = (1 - a) * nn.functional.cross_entropy(z, y[idx]) + a * T * T * soft
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(y):.4f}")
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]
