"""Fit a bundle's confidence entry on the validation split: temperatures per stage of the anytime
order, the chance of a right answer per stage (isotonic regression of correctness on the calibrated
top probability), and adaptive-budget thresholds for the standard tolerances. Numpy and
scikit-learn, no torch, so that `quorum calibration --write` refits a bundle on a small device.
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
from quorum.runtime.manifest import AdaptiveRule, ConfidenceEntry, CorrectnessMap

__all__ = ["fit_confidence", "fit_correctness", "stage_answers"]


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


def fit_correctness(top: np.ndarray, correct: np.ndarray) -> list[CorrectnessMap]:
    """Per stage, the nondecreasing map from calibrated top probability (S, N) to how often the
    answer is right (correct (S, N), bool): isotonic regression, kept as the knots where its
    pieces start and end."""
    from sklearn.isotonic import IsotonicRegression

    maps = []
    for x, hit in zip(np.asarray(top, np.float64), np.asarray(correct, np.float64), strict=True):
        fit = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, hit)
        knots_x, first = np.unique(np.round(fit.X_thresholds_, 6), return_index=True)
        knots_y = np.maximum.accumulate(np.clip(np.round(fit.y_thresholds_[first], 6), 0.0, 1.0))
        maps.append(CorrectnessMap(top=knots_x.tolist(), right=knots_y.tolist()))
    return maps


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
        correctness=fit_correctness(top, labels == y[None]),
    )
