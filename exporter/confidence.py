"""Fit a bundle's confidence entry on the validation split: temperatures per stage of the anytime
order, and adaptive-budget thresholds for the standard tolerances. Numpy only, so that
`quorum calibration --write` refits a bundle on a device without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quorum.runtime.confidence import (
    SIGNAL,
    STANDARD_TOLERANCES,
    choose_thresholds,
    fit_temperatures,
    prefix_means,
    stage_lengths,
    tempered_softmax,
)
from quorum.runtime.manifest import AdaptiveRule, ConfidenceEntry

__all__ = ["fit_confidence", "stage_answers"]


def stage_answers(
    logits: np.ndarray,
    order: Sequence[int],
    stages: Sequence[int],
    temperatures: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top probability (S, N) and label (S, N) of each stage's prefix of `order`, from module logits
    (N, M, K); tempered by each stage's temperature if given."""
    z = prefix_means(logits, order, stages)  # (S, N, K)
    temps = np.ones(len(stages)) if temperatures is None else np.asarray(temperatures, np.float64)
    p = tempered_softmax(z, temps[:, None])
    return p.max(axis=2), p.argmax(axis=2)


def fit_confidence(logits: np.ndarray, y: np.ndarray, order: Sequence[int]) -> ConfidenceEntry:
    """The confidence entry of a classifier with validation logits (N, M, K) and labels y (N,)."""
    y = np.asarray(y)
    stages = stage_lengths(logits.shape[1])
    temperatures = fit_temperatures(prefix_means(logits, order, stages), y)
    top, labels = stage_answers(logits, order, stages, temperatures)
    rules = []
    for tolerance in STANDARD_TOLERANCES:
        thresholds, accuracy, modules = choose_thresholds(top, labels, y, stages, tolerance)
        rules.append(
            AdaptiveRule(tolerance=tolerance, thresholds=thresholds, val_accuracy=accuracy, val_mean_modules=modules)
        )
    return ConfidenceEntry(
        stages=stages,
        temperatures=[float(t) for t in temperatures],
        signal=SIGNAL,
        rules=rules,
        val_accuracy=float((labels[-1] == y).mean()),
    )
