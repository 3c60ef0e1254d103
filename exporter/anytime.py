"""The anytime order a bundle ships: greedy selection on validation, or the order the run trained.

A run trained with `--loss prefix` trained its prefixes 0..b−1 in module index order
(trainer/prefix.py); export keeps that order when its prefixes validate better than greedy
selection's (`selection.classifier_anytime_order`), and says which in the manifest
(`anytime_source`). "Better" is the lower mean validation error (classes; other tasks: NLL) over
the prefix lengths the loss trains, 1, 2, 4, …, M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from quorum.core.tasks import Task
from quorum.exporter.selection import ANYTIME_CRITERION, classifier_anytime_order, greedy_anytime_order
from quorum.trainer.prefix import prefix_lengths

__all__ = ["TRAINED_CRITERION", "AnytimeChoice", "choose_anytime_order", "prefix_errors"]

AnytimeSource = Literal["greedy", "trained"]
TRAINED_CRITERION = (
    "module index order, trained by the prefix-aware loss; kept because its prefixes 1, 2, 4, …, M had a lower "
    "mean validation error than greedy selection's"
)


@dataclass
class AnytimeChoice:
    order: list[int]  # the shipped anytime order
    source: AnytimeSource  # greedy: selection on validation; trained: module index order
    criterion: str  # the manifest's anytime_criterion
    greedy_order: list[int]
    greedy_val: list[float]  # validation error (NLL: other tasks) of the greedy order's prefixes 1, 2, 4, …, M
    trained_val: list[float] | None  # the same for the index order; None where the run trained no order


@torch.no_grad()
def prefix_errors(
    logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, order: list[int], task: Task
) -> list[float]:
    """Error rate (classes; other tasks: the NLL) of the prefixes of lengths 1, 2, 4, …, M of `order`,
    from every module's logits (N, M, K) and targets y."""
    logits, y = torch.as_tensor(logits), torch.as_tensor(y)
    lengths = torch.tensor(prefix_lengths(logits.shape[1]))
    csum = logits.index_select(1, torch.as_tensor(order)).cumsum(dim=1)  # (N, M, K)
    shape = (1, -1) + (1,) * (logits.dim() - 2)
    means = csum.index_select(1, lengths - 1) / lengths.to(csum.dtype).view(shape)  # (N, n, K)
    if task.has_classes:
        return (means.argmax(-1) != y.unsqueeze(1)).double().mean(0).tolist()
    return task.combined_nll(means, y).double().mean(0).tolist()


def choose_anytime_order(
    logits: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    task: Task,
    *,
    trained: bool,
    progress: bool = False,
) -> AnytimeChoice:
    """The anytime order of a bundle from validation logits (N, M, K) and targets: greedy selection, or the
    module index order where the run `trained` it and it validates better (module docstring)."""
    if task.has_classes:
        greedy = classifier_anytime_order(logits, y, progress=progress)
    else:
        greedy = greedy_anytime_order(logits, y, progress=progress, task=task)
    greedy_val = prefix_errors(logits, y, greedy, task)
    if not trained:
        return AnytimeChoice(greedy, "greedy", ANYTIME_CRITERION, greedy, greedy_val, None)
    index = list(range(torch.as_tensor(logits).shape[1]))
    trained_val = prefix_errors(logits, y, index, task)
    if float(np.mean(trained_val)) < float(np.mean(greedy_val)):
        return AnytimeChoice(index, "trained", TRAINED_CRITERION, greedy, greedy_val, trained_val)
    return AnytimeChoice(greedy, "greedy", ANYTIME_CRITERION, greedy, greedy_val, trained_val)
