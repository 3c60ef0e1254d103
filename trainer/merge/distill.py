"""Knowledge distillation of an ensemble into one MLP (permAVG thesis eq. 15, after Hinton et al.):

    loss = (1 - α) CE(p_s(1), y) + α τ² KL(p_t(τ) ‖ p_s(τ))

with the teacher's distribution p_t the ensemble's combined prediction (mean of logits, softmax)
and the student a freshly initialized network of one member's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quorum.trainer.merge._fit import fit_epochs
from quorum.trainer.merge.layers import Layers, as_module

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
    student = as_module(shape, (shape[0][0].shape[1],)).train()
    linears = [m for m in student if isinstance(m, nn.Linear)]
    torch.manual_seed(config.seed)
    for linear in linears:
        linear.reset_parameters()  # a fresh network of the members' shape
    opt = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9)
    T, a = config.temperature, config.alpha

    def step(idx: torch.Tensor) -> float:
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
        return loss.item()

    fit_epochs(step, len(y), epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, desc="distill",
               progress=progress)  # fmt: skip
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]
