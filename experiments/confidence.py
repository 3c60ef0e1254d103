"""`quorum calibration` and `quorum ood`: how sure a bundle's answers are, measured on Fashion-MNIST.

- calibration: ECE and NLL per budget of the anytime order, before and after the bundle's
  temperatures, on the test split, and the ECE of p_correct beside what a perfectly calibrated
  bundle would measure on splits of these sizes (`calibrated_ece`) and how far the mean p_correct lies
  from the accuracy on the validation and the test split; adaptive budgets (each fitted
  tolerance) against fixed budgets at the same mean number of modules, and the fewest modules within
  0.1 point of the whole ensemble with its spread over resamples of the test inputs
  (`fewest_within_resampled`); a reliability diagram and the accuracy-against-modules curve as one
  PNG. `--write` (re)fits temperatures and thresholds on the run's validation split and stores them
  in the manifest, for bundles exported before they existed or before the exit signal of schema
  version 6.
- ood: the AUROC with which each uncertainty signal tells the test split from inputs the
  ensemble never saw (scikit-learn's 8×8 digits scaled to 28×28, inverted and noised test
  images), at several budgets.

Everything runs on the bundle's modules through ONNX Runtime: no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from quorum.core.datasets import load_raw
from quorum.core.errors import QuorumError
from quorum.exporter.confidence import CrossFitted, cross_fitted_means, fit_confidence, fit_correctness
from quorum.runtime.confidence import (
    RATES,
    MemberSums,
    adaptive_exits,
    correctness_at,
    doubling_lengths,
    expected_calibration_error,
    negative_log_likelihood,
    prefix_means,
    prefix_signals,
    reliability,
    stage_lengths,
    stage_signals,
    stage_thresholds,
    temperature_at,
    tempered_softmax,
    top_label_ece,
    uncertainty,
)
from quorum.runtime.engine import Engine
from quorum.runtime.manifest import SCHEMA_VERSION, ConfidenceEntry, Manifest

__all__ = [
    "CalibrationReport",
    "auroc",
    "best_temperature_ece",
    "calibrated_ece",
    "calibration_report",
    "fewest_within_resampled",
    "ood_report",
    "validation_split",
]

VAL_SIZE = 10_000  # the trainer's default hold-out (quorum train --val-size)
FLOOR_DRAWS = 100  # draws of `calibrated_ece` per budget: its mean to about ±0.03 points
RESAMPLES = 1000  # bootstrap resamples of the test inputs for `fewest_within_resampled`
PLOT_MIN_BIN = 20  # reliability diagrams leave out confidence bins with fewer answers (their ECE counts them)

log = logging.getLogger(__name__)


def validation_split(seed: int, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images (raw) and labels: the trainer's seeded hold-out of the default size."""
    x, y = load_raw(data_dir)["train"]
    idx = np.random.default_rng(seed).permutation(len(y))[:VAL_SIZE]
    return x[idx].astype(np.float32), y[idx].astype(np.int64)


def _fashion_bundle(manifest: Manifest) -> None:
    if manifest.training.dataset != "fashion-mnist" or not manifest.task.task.has_classes:
        raise QuorumError(
            f"bundle {manifest.name!r} is a {manifest.training.dataset} {manifest.task.kind} model; "
            "these reports measure Fashion-MNIST classifiers"
        )


@dataclass
class CalibrationReport:
    budgets: list[int]
    ece_before: list[float]
    ece_after: list[float]
    nll_before: list[float]
    nll_after: list[float]
    ece_best: list[float] = field(default_factory=list)  # at the temperature best for this split itself: a floor
    ece_p_correct: list[float] = field(default_factory=list)  # of p_correct as the confidence (empty: not fitted)
    ece_if_calibrated: list[tuple[float, float]] = field(default_factory=list)  # `calibrated_ece`: mean, 95th pct
    p_correct_gap: list[tuple[float, float]] = field(default_factory=list)  # mean p_correct less accuracy: val, test
    adaptive: list[dict[str, float]] = field(default_factory=list)  # per tolerance: test accuracy, mean modules
    fixed_accuracy: list[float] = field(default_factory=list)  # test accuracy of the first b modules, b = 1..M
    curve: list[tuple[float, float]] = field(default_factory=list)  # (mean modules, test accuracy) per exit rate
    fewest_resampled: list[float] = field(default_factory=list)  # `fewest_within_resampled` of the curve

    def fixed_at(self, modules: float) -> float:
        """Test accuracy of fixed budgets at a mean number of modules (interpolated between budgets)."""
        return float(np.interp(modules, np.arange(1, len(self.fixed_accuracy) + 1), self.fixed_accuracy))

    def beats_fixed(self, low: float = 4, high: float = 128) -> tuple[int, int]:
        """(points of the curve with a mean in [low, high], those more accurate than fixed budgets there)."""
        inside = [(b, a) for b, a in self.curve if low <= b <= high]
        return len(inside), sum(a > self.fixed_at(b) for b, a in inside)

    def fewest_within(self, points: float = 0.001) -> tuple[float, float] | None:
        """(mean modules, accuracy) of the curve's point with the fewest modules whose accuracy is within
        `points` of the whole ensemble's; None where none is."""
        whole = self.fixed_accuracy[-1]
        inside = [(b, a) for b, a in self.curve if a >= whole - points - 1e-12]
        return min(inside) if inside else None

    def table(self) -> str:
        lines = [
            "budget  ECE before  ECE after  ECE at the split's best T  NLL before  NLL after  ECE of p_correct"
            "  if calibrated (95th pct)  p_correct - accuracy: val, test"
        ]
        columns = (self.budgets, self.ece_before, self.ece_after, self.ece_best, self.nll_before, self.nll_after)
        right: list[float | None] = [*self.ece_p_correct] or [None] * len(self.budgets)
        floor: list[tuple[float, float] | None] = [*self.ece_if_calibrated] or [None] * len(self.budgets)
        gap: list[tuple[float, float] | None] = [*self.p_correct_gap] or [None] * len(self.budgets)
        for *row, r, f, g in zip(*columns, right, floor, gap, strict=True):
            line = "{:>6}  {:>9.2%}  {:>9.2%}  {:>26.2%}  {:>10.4f}  {:>9.4f}".format(*row)
            line += f"  {r:>16.2%}" if r is not None else "  " + "not fitted".rjust(16)
            line += f"  {f[0]:>13.2%} ({f[1]:.2%})" if f is not None else ""
            lines.append(line + (f"  {g[0] * 100:>+18.2f}, {g[1] * 100:+.2f}" if g is not None else ""))
        lines.append("(the split's best T: the one temperature per budget that minimizes ECE on these very inputs;")
        lines.append(" no temperature fitted elsewhere does better here. p_correct: each answer's chance of being")
        lines.append(" right, mapped from the calibrated top probability by the bundle's fit on validation. If")
        lines.append(" calibrated: the ECE of p_correct when validation and test answers are drawn right exactly")
        lines.append(f" as often as p_correct says, the map fitted again on each draw ({FLOOR_DRAWS} draws): what")
        lines.append(" splits of these sizes measure of a perfectly calibrated bundle. p_correct - accuracy: the")
        lines.append(" mean chance less how often the answers are right, in points; above 0 the bundle promises more")
        lines.append(" than it delivers on that split)")
        lines.append("")
        lines.append("tolerance  test accuracy  mean modules  fixed budget at that mean  whole ensemble")
        whole = self.fixed_accuracy[-1]
        for a in self.adaptive:
            fixed = self.fixed_at(a["mean_modules"])
            lines.append(
                f"{a['tolerance']:>9.3f}  {a['accuracy']:>13.2%}  {a['mean_modules']:>12.1f}  {fixed:>25.2%}"
                f"  {whole:>14.2%}"
            )
        points, better = self.beats_fixed()
        lines.append("")
        lines.append(
            f"budget=auto against fixed budgets: more accurate at {better} of {points} points of the curve "
            "with a mean of 4 to 128 modules per input"
        )
        fewest = self.fewest_within()
        lines.append(
            "fewest modules per input within 0.1 point of the whole ensemble: "
            + (f"{fewest[0]:.1f} ({fewest[1]:.2%})" if fewest else "none on the curve")
        )
        if self.fewest_resampled:
            draws, quarter = np.asarray(self.fewest_resampled), len(self.fixed_accuracy) / 4
            low, mid, high = np.percentile(draws, [5, 50, 95])
            share = float((draws <= quarter).mean())
            lines.append(
                f"  over {len(draws)} resamples of the test inputs: median {mid:.1f}, 5th to 95th percentile "
                f"{low:.1f} to {high:.1f}, at most a quarter of the modules ({quarter:g}) in {share:.0%}"
            )
        return "\n".join(lines)


def calibration_report(
    bundle: str | Path,
    *,
    write: bool = False,
    plot: str | Path | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
) -> CalibrationReport:
    """The calibration and adaptive-budget report of `bundle` on the test split (see the module docstring)."""
    engine = Engine.load(bundle)
    try:
        manifest = engine.manifest
        _fashion_bundle(manifest)
        order = manifest.anytime_order
        conf = manifest.confidence
        xv, yv = validation_split(manifest.training.seed, data_dir)
        val_logits = engine.module_logits(xv)  # (N, M, K)
        held_out = _held_out(manifest, val_logits, yv)
        if write or conf is None:
            conf = fit_confidence(val_logits, yv, order, held_out=held_out)
            if write:
                manifest = manifest.model_copy(update={"confidence": conf, "version": SCHEMA_VERSION})
                manifest.dump(Path(bundle))
        x, y = load_raw(data_dir)["test"]
        x, y = x[:limit].astype(np.float32), y[:limit].astype(np.int64)
        logits = engine.module_logits(x)
    finally:
        engine.close()
    if held_out is None:
        val_stages = prefix_signals(val_logits, order, conf.stages, conf.temperatures, conf.signal)
    else:  # the answers the thresholds are chosen on (fit_confidence)
        val_stages = stage_signals(held_out.means, held_out.errors, conf.temperatures, conf.signal)
    return _report(logits, y, order, conf, plot, val_stages, (val_logits, yv))


def _held_out(manifest: Manifest, logits: np.ndarray, y: np.ndarray) -> CrossFitted | None:
    """`cross_fitted_means` of the validation logits where the bundle's anytime order was chosen on
    them; None for a trained order, or without torch (selection needs it)."""
    if manifest.anytime_source != "greedy":
        return None
    try:
        from quorum.exporter._candidates import side_by_side
        from quorum.exporter.selection import classifier_anytime_order
    except ImportError:
        log.warning("no torch: the thresholds come from the anytime order's own validation answers, which flatter it")
        return None
    with side_by_side() as side:
        return cross_fitted_means(logits, y, stage_lengths(logits.shape[1]), classifier_anytime_order, beside=side)


def _report(
    logits: np.ndarray,
    y: np.ndarray,
    order: Sequence[int],
    conf: ConfidenceEntry,
    plot: str | Path | None,
    val_stages: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> CalibrationReport:
    m = logits.shape[1]
    budgets = doubling_lengths(m)
    z = prefix_means(logits, order, budgets)
    temps = temperature_at(conf.stages, conf.temperatures, np.asarray(budgets))
    z_val = None if val is None else prefix_means(val[0], order, budgets)
    before = [tempered_softmax(zb) for zb in z]
    after = [tempered_softmax(zb, t) for zb, t in zip(z, temps, strict=True)]
    report = CalibrationReport(
        budgets=budgets,
        ece_before=[expected_calibration_error(p, y) for p in before],
        ece_after=[expected_calibration_error(p, y) for p in after],
        nll_before=[negative_log_likelihood(p, y) for p in before],
        nll_after=[negative_log_likelihood(p, y) for p in after],
        ece_best=[best_temperature_ece(zb, y) for zb in z],
    )
    p_correct: list[np.ndarray] = []  # per budget
    maps = conf.correctness_knots()
    if maps is not None:
        for i, (b, p) in enumerate(zip(budgets, after, strict=True)):
            p_correct.append(correctness_at(conf.stages, maps, b, p.max(axis=1)))
            right = (p.argmax(axis=1) == y).astype(np.float64)
            report.ece_p_correct.append(top_label_ece(p_correct[-1], right))
            if z_val is not None and val is not None:
                p_val = tempered_softmax(z_val[i], temps[i])
                val_top, val_right = p_val.max(axis=1), p_val.argmax(axis=1) == val[1]
                draws = calibrated_ece(val_top, p.max(axis=1), partial(correctness_at, conf.stages, maps, b))
                report.ece_if_calibrated.append((float(draws.mean()), float(np.percentile(draws, 95))))
                val_gap = correctness_at(conf.stages, maps, b, val_top).mean(dtype=np.float64) - val_right.mean()
                report.p_correct_gap.append(
                    (float(val_gap), float(p_correct[-1].mean(dtype=np.float64) - right.mean()))
                )
    every = prefix_means(logits, order, range(1, m + 1))
    report.fixed_accuracy = [float((zb.argmax(axis=1) == y).mean()) for zb in every]
    signal, labels = prefix_signals(logits, order, conf.stages, conf.temperatures, conf.signal)
    correct = labels == y[None]
    lengths = np.asarray(conf.stages, np.float64)
    for rule in conf.rules:
        exits = adaptive_exits(signal, rule.thresholds)
        report.adaptive.append(
            {
                "tolerance": rule.tolerance,
                "accuracy": float(correct[exits, np.arange(len(y))].mean()),
                "mean_modules": float(lengths[exits].mean()),
            }
        )
    exit_right, exit_modules = [], []  # per exit rate and input
    for thresholds in stage_thresholds(*val_stages, RATES):  # thresholds from validation, measured on test
        exits = adaptive_exits(signal, thresholds)
        exit_right.append(correct[exits, np.arange(len(y))])
        exit_modules.append(lengths[exits])
        report.curve.append((float(exit_modules[-1].mean()), float(exit_right[-1].mean())))
    report.curve.sort()
    resampled = fewest_within_resampled(np.array(exit_right), np.array(exit_modules), correct[-1])
    report.fewest_resampled = resampled.tolist()
    if plot is not None:
        _plot(report, before, after, p_correct, y, plot)
    return report


def calibrated_ece(
    val_top: np.ndarray,
    test_top: np.ndarray,
    chance: Callable[[np.ndarray], np.ndarray],
    *,
    draws: int = FLOOR_DRAWS,
    seed: int = 0,
) -> np.ndarray:
    """The ECE (draws,) of p_correct on a perfectly calibrated bundle, measured as `quorum calibration`
    measures it: validation answers with calibrated top probability `val_top` (N,) and test answers with
    `test_top` (N',) are each drawn right with the chance `chance(top)` gives them, a map is fitted on the
    validation draws (`fit_correctness`, as the exporter fits it, without its lowering by the order's
    optimism, whose own noise this leaves out) and its ECE taken on the test draws. What is left over this
    is the bundle's; this much the finite splits give any fit."""
    rng = np.random.default_rng(seed)
    val_top, test_top = np.asarray(val_top, np.float64), np.asarray(test_top, np.float64)
    p_val, p_test = chance(val_top), chance(test_top)
    out = np.empty(draws)
    for i in range(draws):
        fit = fit_correctness(val_top[None], (rng.random(p_val.shape) < p_val)[None])[0]
        right = (rng.random(p_test.shape) < p_test).astype(np.float64)
        out[i] = top_label_ece(np.interp(test_top, fit.top, fit.right), right)
    return out


def fewest_within_resampled(
    right: np.ndarray,
    modules: np.ndarray,
    whole_right: np.ndarray,
    points: float = 0.001,
    *,
    draws: int = RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """`CalibrationReport.fewest_within` on `draws` bootstrap resamples of the test inputs (draws,): how far
    the test split alone moves the fewest modules per input within `points` of the whole ensemble.

    `right` (R, N): whether each input's answer is right under each of R exit rules (fixed thresholds),
    `modules` (R, N) how many modules it used, `whole_right` (N,) whether the whole ensemble is right.
    Where no rule is within `points` in a resample, the whole ensemble is (all of its modules). The
    whole and the rules are resampled together, so that only the inputs where they differ move the gap."""
    right, modules = np.asarray(right, np.float64), np.asarray(modules, np.float64)
    whole_right = np.asarray(whole_right, np.float64)
    n = len(whole_right)
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for i in range(draws):
        count = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)  # exact sums of whole numbers
        within = right @ count >= whole_right @ count - points * n - 1e-9
        out[i] = float((modules @ count)[within].min()) / n if within.any() else float(modules.max())
    return out


def best_temperature_ece(z: np.ndarray, y: np.ndarray) -> float:
    """The lowest ECE that any one temperature gives mean logits z (N, K) against their own labels y: a
    log-spaced grid from 0.25 to 30 (and 1, no temperature), then a finer one around its best."""
    best = (np.inf, 1.0)
    for grid in (np.append(np.geomspace(0.25, 30.0, 61), 1.0), None):
        if grid is None:
            grid = best[1] * np.geomspace(0.93, 1.07, 15)
        for t in grid:
            best = min(best, (expected_calibration_error(tempered_softmax(z, t), y), float(t)))
    return best[0]


def _plot(
    report: CalibrationReport,
    before: list[np.ndarray],
    after: list[np.ndarray],
    p_correct: list[np.ndarray],
    y: np.ndarray,
    path: str | Path,
) -> None:
    """Reliability diagrams at budgets 1, 8, 32 and M (`p_correct`: per budget, or empty), and the
    adaptive curve against fixed budgets, as one PNG."""
    if p_correct and len(p_correct) != len(report.budgets):
        raise ValueError(f"p_correct: one array per budget ({len(report.budgets)}), got {len(p_correct)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [i for i, b in enumerate(report.budgets) if b in (1, 8, 32, report.budgets[-1])]
    fig, axes = plt.subplots(1, len(shown) + 2, figsize=(4 * (len(shown) + 2), 4))
    for ax, i in zip(axes, shown, strict=False):
        series: list[tuple[np.ndarray, np.ndarray | None, str]] = [
            (before[i], None, "top probability, T = 1"),
            (after[i], None, "top probability, fitted T"),
        ]
        if p_correct:
            series.append((after[i], p_correct[i], "p_correct"))
        for probs, confidence, name in series:
            conf, acc, count = reliability(probs, y, confidence=confidence)
            seen = count >= PLOT_MIN_BIN  # a bin of a few answers is noise, drawn as loud as a full one
            ece = top_label_ece(
                probs.max(axis=1) if confidence is None else confidence, (probs.argmax(axis=1) == y).astype(float)
            )
            ax.plot(conf[seen], acc[seen], "o-", label=f"{name} (ECE {ece:.1%})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(
            title=f"budget {report.budgets[i]} (bins of >= {PLOT_MIN_BIN} answers)",
            xlabel="confidence",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(loc="upper left", fontsize=8)
    b = np.arange(1, len(report.fixed_accuracy) + 1)
    whole, quarter = report.fixed_accuracy[-1], len(b) / 4
    for ax, zoom in zip(axes[-2:], (False, True), strict=True):
        ax.plot(b, report.fixed_accuracy, label="fixed budget (anytime order)")
        ax.plot(*zip(*report.curve, strict=True), "-", color="C1", label="budget=auto (exit rates)")
        ax.plot(
            [a["mean_modules"] for a in report.adaptive],
            [a["accuracy"] for a in report.adaptive],
            "o",
            color="C1",
            label="budget=auto (fitted tolerances)",
        )
        ax.axhline(whole - 0.001, color="k", ls=":", lw=1, label="0.1 point below the whole ensemble")
        ax.axvline(quarter, color="0.5", ls=":", lw=1, label=f"a quarter of the modules ({quarter:g})")
        ax.set(xscale="log", xlabel="modules per input (mean)", ylabel="test accuracy")
        if zoom:  # where the target is decided: the last points below the whole ensemble
            ax.set(
                title="near the whole ensemble", xlim=(quarter / 4, len(b) * 1.1), ylim=(whole - 0.01, whole + 0.003)
            )
            ticks = [2**e for e in range(len(b).bit_length()) if quarter / 4 <= 2**e]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        else:
            ax.set(title="adaptive against fixed", ylim=(report.fixed_accuracy[1] - 0.02, whole + 0.01))
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- out of distribution


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside input > score of an inside one), ties counted half (Mann-Whitney U)."""
    scores = np.concatenate([inside, outside])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks[order] = np.arange(1, len(scores) + 1)
    # average the ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first[counts > 1], counts[counts > 1], strict=True):
        ranks[order[f : f + c]] = ranks[order[f : f + c]].mean()
    u = ranks[len(inside) :].sum() - len(outside) * (len(outside) + 1) / 2
    return float(u / (len(inside) * len(outside)))


def ood_sets(x_test: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs the ensemble never saw, as raw 0..255 images (N, 784)."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images  # (1797, 8, 8), values 0..16
    big = _scaled(digits)
    noised = np.clip(x_test + rng.normal(0, 100, x_test.shape), 0, 255)
    return {
        "digits (8x8 to 28x28)": big.reshape(len(big), -1).astype(np.float32),
        "inverted test images": (255.0 - x_test).astype(np.float32),
        "test images + noise (sd 100)": noised.astype(np.float32),
    }


def _scaled(digits: np.ndarray) -> np.ndarray:
    """8×8 digits (0..16) as 28×28 images (0..255): each pixel 3×3, centred with a 2-pixel border."""
    big = np.kron(digits, np.ones((3, 3))) * (255.0 / 16.0)  # (N, 24, 24)
    out = np.zeros((len(digits), 28, 28))
    out[:, 2:26, 2:26] = big
    return out


SIGNALS = ("entropy", "mutual information", "1 - vote share", "1 - top probability")


def _signals(logits: np.ndarray, order: Sequence[int], b: int, conf: ConfidenceEntry | None) -> dict[str, np.ndarray]:
    """Each uncertainty signal of the first b modules of `order`, per input (higher: less sure)."""
    ids = list(order[:b])
    z = logits[:, ids].mean(axis=1)
    t = 1.0 if conf is None else float(temperature_at(conf.stages, conf.temperatures, b))
    p = tempered_softmax(z.astype(np.float64), t)
    labels = p.argmax(axis=1)
    sums = MemberSums.of(logits[:, ids].transpose(1, 0, 2))
    u = uncertainty(p, labels, sums, np.full(len(z), b))
    assert u.mutual_information is not None and u.vote_share is not None
    return {
        "entropy": u.entropy,
        "mutual information": u.mutual_information,
        "1 - vote share": 1.0 - u.vote_share,
        "1 - top probability": 1.0 - p.max(axis=1),
    }


def ood_report(
    bundle: str | Path, *, budgets: Sequence[int] | None = None, data_dir: str | None = None, limit: int | None = None
) -> list[dict[str, object]]:
    """Rows (set, budget, signal, AUROC): the test split against each out-of-distribution set."""
    engine = Engine.load(bundle)
    try:
        manifest = engine.manifest
        _fashion_bundle(manifest)
        m = len(manifest.modules)
        budgets = [b for b in (budgets or (1, 8, 32, m)) if 1 <= b <= m]
        x, _ = load_raw(data_dir)["test"]
        x = x[:limit].astype(np.float32)
        inside = engine.module_logits(x)
        outside = {name: engine.module_logits(xo) for name, xo in ood_sets(x).items()}
    finally:
        engine.close()
    rows: list[dict[str, object]] = []
    order, conf = manifest.anytime_order, manifest.confidence
    for b in budgets:
        ins = _signals(inside, order, b, conf)
        for name, logits in outside.items():
            outs = _signals(logits, order, b, conf)
            for signal in SIGNALS:
                rows.append({"set": name, "budget": b, "signal": signal, "auroc": auroc(ins[signal], outs[signal])})
    return rows


def format_ood(rows: list[dict[str, object]]) -> str:
    """One line per set and budget, one column per signal."""
    lines = ["set                            budget  " + "  ".join(f"{s:>19}" for s in SIGNALS)]
    keys = sorted({(str(r["set"]), int(str(r["budget"]))) for r in rows}, key=lambda k: (k[0], k[1]))
    for name, b in keys:
        values = {str(r["signal"]): float(str(r["auroc"])) for r in rows if r["set"] == name and r["budget"] == b}
        lines.append(f"{name:<30} {b:>6}  " + "  ".join(f"{values[s]:>19.3f}" for s in SIGNALS))
    return "\n".join(lines)
