"""Fit a bundle's confidence entry on the validation split: temperatures per stage of the anytime
order, the chance of a right answer per stage (isotonic regression of correctness on the calibrated
top probability), and adaptive-budget thresholds on the exit signal (`runtime.confidence.SIGNAL`) for
the standard tolerances (where the order was chosen on the split, from the answers of orders chosen on
its other half, `cross_fitted_means`, whose optimism also lowers the chances).
Numpy, scikit-learn and scipy, no torch, so that `quorum calibration --write` refits a bundle on a small
device (choosing the orders again needs torch; without it the thresholds come from the order's own
answers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, logit

from quorum.runtime.confidence import (
    SIGNAL,
    STANDARD_TOLERANCES,
    choose_thresholds,
    fit_temperatures,
    prefix_errors,
    prefix_means,
    stage_lengths,
    stage_signals,
    tempered_softmax,
)
from quorum.runtime.manifest import AdaptiveRule, ConfidenceEntry, CorrectnessMap

__all__ = ["CrossFitted", "cross_fitted_means", "fit_confidence", "fit_correctness", "lowered"]


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


@dataclass(frozen=True)
class CrossFitted:
    """Answers of orders chosen on one half of a split, measured on the other (`cross_fitted_means`)."""

    means: np.ndarray  # (S, N, K) prefix means of every input under the order chosen without it
    errors: np.ndarray  # (S, N) the standard errors of their leads (`prefix_errors`), for the exit signal
    y: np.ndarray  # (N,) the labels in the rows' order
    optimism: np.ndarray  # (S,) how much more often each stage is right on the half that chose its order


def cross_fitted_means(
    logits: np.ndarray,
    y: np.ndarray,
    stages: Sequence[int],
    choose_order: Callable[[np.ndarray, np.ndarray], Sequence[int]],
    *,
    beside: Executor | None = None,
    seed: int = 0,
) -> CrossFitted:
    """Prefix means of every input under an order chosen without it: `choose_order` on each random half
    of (logits (N, M, K), y), its prefixes measured on the other half (one half's choice on `beside`, if
    given, while this thread makes the other's). The order chosen on all inputs looks better on them than
    on new ones; these answers do not (docs/RESULTS.md, "Adaptive budgets, calibration and uncertainty").
    `optimism`: per stage, the accuracy of each half's prefix on its own half less that on the other, the
    mean of the two: what choosing an order on some inputs adds to its accuracy there."""
    half = np.random.default_rng(seed).permutation(len(y)) < len(y) // 2
    parts = [(half, ~half), (~half, half)]
    later = None if beside is None else beside.submit(choose_order, logits[~half], y[~half])
    orders = [choose_order(logits[half], y[half]), later.result() if later else choose_order(logits[~half], y[~half])]
    z, errors, optimism = [], [], []
    for order, (chose, held) in zip(orders, parts, strict=True):
        z.append(prefix_means(logits[held], list(order), stages))
        errors.append(prefix_errors(logits[held], list(order), stages))
        inside = prefix_means(logits[chose], list(order), stages).argmax(axis=2) == y[chose][None]
        optimism.append(inside.mean(axis=1) - (z[-1].argmax(axis=2) == y[held][None]).mean(axis=1))
    return CrossFitted(
        np.concatenate(z, axis=1),
        np.concatenate(errors, axis=1),
        np.concatenate([y[held] for _, held in parts]),
        np.mean(optimism, 0),
    )


def lowered(chance: CorrectnessMap, top: np.ndarray, by: float) -> CorrectnessMap:
    """`chance` with its values lowered by one shift in log-odds, so that its mean over the top
    probabilities `top` (N,) falls by `by` (nothing where `by` <= 0); its shape is kept."""
    knots, odds = np.asarray(chance.top), logit(np.clip(chance.right, 1e-6, 1 - 1e-6))
    before = float(np.interp(top, knots, chance.right).mean())
    if by <= 0 or before <= 0:
        return chance
    target = max(before - by, 1e-6)
    delta = brentq(lambda d: float(np.interp(top, knots, expit(odds - d)).mean()) - target, 0.0, 40.0)
    right = np.maximum.accumulate(np.clip(np.round(expit(odds - delta), 6), 0.0, 1.0))
    return CorrectnessMap(top=chance.top, right=right.tolist())


def fit_confidence(
    logits: np.ndarray,
    y: np.ndarray,
    order: Sequence[int],
    *,
    held_out: CrossFitted | None = None,
) -> ConfidenceEntry:
    """The confidence entry of a classifier with validation logits (N, M, K) and labels y (N,).

    `held_out`: `cross_fitted_means` of these inputs, where `order` was chosen on them (None: it was
    not, e.g. a trained order). Then the thresholds come from those answers, so that a tolerance holds
    on new inputs too, and the temperatures from those and the order's own together (T >= 1 only
    flattens, and those are less flattered). The correctness maps are fitted on the order's own answers,
    since a map describes the prefix's modules and the other halves' orders often begin with other ones,
    and then `lowered` by the optimism the other halves measured at each stage (docs/NOTEBOOK.md,
    "Calibration and adaptive budgets")."""
    y = np.asarray(y)
    stages = stage_lengths(logits.shape[1])
    own = prefix_means(logits, order, stages)
    z_rule, y_rule = (own, y) if held_out is None else (held_out.means, held_out.y)
    if held_out is None:
        temperatures = fit_temperatures(own, y)
    else:
        temperatures = fit_temperatures(np.concatenate([own, z_rule], axis=1), np.concatenate([y, y_rule]))
    p = tempered_softmax(own, temperatures[:, None])
    errors = prefix_errors(logits, order, stages) if held_out is None else held_out.errors
    signal, labels = stage_signals(z_rule, errors, temperatures)
    rules = []
    for tolerance in STANDARD_TOLERANCES:
        thresholds, accuracy, modules = choose_thresholds(signal, labels, y_rule, stages, tolerance)
        rules.append(
            AdaptiveRule(tolerance=tolerance, thresholds=thresholds, val_accuracy=accuracy, val_mean_modules=modules)
        )
    own_top = p.max(axis=2)
    maps = fit_correctness(own_top, p.argmax(axis=2) == y[None])
    if held_out is not None:
        maps = [lowered(m, x, float(by)) for m, x, by in zip(maps, own_top, held_out.optimism, strict=True)]
    return ConfidenceEntry(
        stages=stages,
        temperatures=[float(t) for t in temperatures],
        signal=SIGNAL,
        rules=rules,
        val_accuracy=float((p[-1].argmax(axis=1) == y).mean()),
        correctness=maps,
    )
