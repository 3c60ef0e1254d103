"""The minibatch loop that permAVG and distillation share: shuffled epochs, a progress bar."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

__all__ = ["fit_epochs"]


def fit_epochs(
    step: Callable[[torch.Tensor], float],
    n: int,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool = True,
    end_of_epoch: Callable[[], None] = lambda: None,
) -> None:
    """Call `step(indices)` (one optimizer step; it returns the batch's mean loss) on shuffled batches
    of range(n) for `epochs` epochs, then `end_of_epoch()` after each (e.g. a scheduler)."""
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            total += step(idx) * len(idx)
        end_of_epoch()
        bar.set_postfix(loss=f"{total / n:.4f}")
