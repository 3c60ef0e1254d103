"""Learning-rate schedules (`--schedule`), stepped once per minibatch.

- `constant`: the rate `--lr` throughout (the papers' recipe);
- `cosine`: linear warmup from lr/w to lr over the first `--warmup-epochs` (w steps), then a
  half cosine from lr down to 0 at the last step of `--epochs`.

The scheduler's state (the step count) is saved in `last.pt` beside the optimizer's, so a resumed
run continues the same curve; a cosine run therefore keeps its `--epochs` when resumed.
"""

from __future__ import annotations

import math

import torch

from quorum.trainer.errors import ConfigError

__all__ = ["SCHEDULES", "lr_factor", "make_scheduler"]

SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiple of the base rate used at 0-based `step` of `total_steps`."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"unknown --schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, decay) / decay))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int, warmup_epochs: float
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The scheduler of `schedule` over `epochs` of `steps_per_epoch`; None for a constant rate.

    Create it before loading a resumed optimizer's state, then load its own state: the optimizer's
    saved rate is the one of the next step."""
    if schedule == "constant":
        return None
    total = epochs * steps_per_epoch
    warmup = min(total, round(warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total, warmup))
