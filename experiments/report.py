"""A run's training report: ensemble vs member error, output entropy, module dominance.

    quorum report runs/demo            # writes runs/demo/report.png and runs/demo/report.json

`report.png` is the papers' "ensemble vs member error" figure: the ensemble's validation error
per epoch against the per-module errors (median, min-max band, the module that was best at the
dominance epoch, the module that is best at the end). The summary adds the per-module output
entropy on the test set (Table 6 of the joint-training paper) and the dominance check of
trainer/diagnostics.py, recomputed from metrics.jsonl for runs that predate it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quorum.core.tasks import get_task
from quorum.trainer.checkpoint import atomic_write_text
from quorum.trainer.diagnostics import Dominance, EntropyStats, check_dominance, entropy_stats, oracle_accuracy
from quorum.trainer.errors import RunDirError
from quorum.trainer.evaluate import evaluate_logits, module_logits
from quorum.trainer.run import LoadedRun, load_best
from quorum.trainer.train import load_data

__all__ = ["Report", "dominance_from_metrics", "make_report", "plot_errors"]


@dataclass
class Report:
    run_dir: Path
    name: str  # the papers' naming, e.g. 256-M-4-H
    lam: float
    epochs_done: int
    best_epoch: int  # epoch whose weights are in best.pt; the test numbers are of these weights
    val_error: float  # ensemble validation error at best_epoch
    test_error: float  # ensemble test error
    test_module_errors: list[float]  # (M,) each module's test error
    oracle_accuracy: float  # test images that at least one module gets right
    entropy: EntropyStats  # on the test set, in nats
    num_classes: int  # K: entropies lie in [0, ln K]
    dominance_epoch: int  # 0 = check off
    dominance: Dominance | None  # None when off or the run is shorter than the dominance epoch
    dominance_source: str  # "recorded" | "recomputed" | "approximate" (median replaced by mean) | "none"
    plot: Path

    def to_dict(self) -> dict[str, Any]:
        errs = self.test_module_errors
        return {
            "run": str(self.run_dir),
            "name": self.name,
            "lam": self.lam,
            "epochs_done": self.epochs_done,
            "best_epoch": self.best_epoch,
            "val_error": self.val_error,
            "test_error": self.test_error,
            "test_module_error": {"min": min(errs), "median": statistics.median(errs), "max": max(errs)},
            "test_module_errors": errs,
            "oracle_accuracy": self.oracle_accuracy,
            "entropy_nats": self.entropy.to_dict(),
            "entropy_max_nats": math.log(self.num_classes),
            "dominance_epoch": self.dominance_epoch,
            "dominance": None if self.dominance is None else self.dominance.to_dict(),
            "dominance_source": self.dominance_source,
            "plot": str(self.plot),
        }

    def summary(self) -> str:
        errs, h = self.test_module_errors, self.entropy
        lines = [
            f"{self.run_dir}: {self.name}, λ={self.lam:g}, {self.epochs_done} epochs, best epoch {self.best_epoch}",
            f"  ensemble error: validation {self.val_error:.4f}, test {self.test_error:.4f}",
            f"  module test error: min {min(errs):.4f}, median {statistics.median(errs):.4f}, max {max(errs):.4f}; "
            f"oracle accuracy (any module right) {self.oracle_accuracy:.4f}",
            f"  module output entropy on the test set (nats, max ln {self.num_classes} = "
            f"{math.log(self.num_classes):.4f}): min {h.min:.4f}, max {h.max:.4f}, mean {h.mean:.4f}, "
            f"std {h.std:.4f}; ensemble {h.ensemble:.4f}",
            f"  {self._dominance_line()}",
            f"  plot: {self.plot}",
        ]
        return "\n".join(lines)

    def _dominance_line(self) -> str:
        if self.dominance_epoch == 0:
            return "dominance check: off (--dominance-epoch 0)"
        if self.dominance is None:
            return f"dominance check: not evaluated (the run has {self.epochs_done} < {self.dominance_epoch} epochs)"
        note = {
            "recorded": "",
            "recomputed": " [recomputed from metrics.jsonl]",
            "approximate": " [older run: module mean used for the median]",
        }[self.dominance_source]
        return self.dominance.message(self.lam) + note


def dominance_from_metrics(metrics: list[dict[str, Any]], dominance_epoch: int) -> tuple[Dominance | None, str]:
    """The dominance check of a run: as recorded, else recomputed from the epoch's errors.

    Runs written before per-module errors were recorded hold only their min, mean and max; the
    mean then stands in for the median (source "approximate").
    """
    record = next((r for r in metrics if r["epoch"] == dominance_epoch), None)
    if dominance_epoch == 0 or record is None:
        return None, "none"
    if "dominance" in record:
        return Dominance.from_dict(record["dominance"]), "recorded"
    if "val_module_errors" in record:
        dom = check_dominance(dominance_epoch, record["val_module_errors"], record["val_error"], dominance_epoch)
        return dom, "recomputed"
    # Only the best (min) module, the mean and the worst (max) are known: a 3-point stand-in
    # whose median is the mean. The best module's index is unknown (-1).
    stand_in = [record["val_module_error_min"], record["val_module_error_mean"], record["val_module_error_max"]]
    dom = check_dominance(dominance_epoch, stand_in, record["val_error"], dominance_epoch)
    assert dom is not None
    return replace(dom, best_module=-1), "approximate"


def plot_errors(
    metrics: list[dict[str, Any]],
    path: Path,
    *,
    title: str,
    dominance: Dominance | None = None,
) -> None:
    """Ensemble vs member validation error over epochs (left) and the ensemble's learning curve (right), as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in metrics]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax, curve = fig.subplots(1, 2, width_ratios=[3, 2])
    ax.fill_between(
        epochs,
        [r["val_module_error_min"] for r in metrics],
        [r["val_module_error_max"] for r in metrics],
        color="tab:gray",
        alpha=0.25,
        label="modules: min–max",
    )
    per_module = all("val_module_errors" in r for r in metrics)
    if per_module:
        ax.plot(epochs, [r["val_module_error_median"] for r in metrics], "o-", color="tab:gray", label="module median")
        last = metrics[-1]["val_module_errors"]
        best_end = min(range(len(last)), key=last.__getitem__)
        if dominance is not None and dominance.best_module >= 0 and dominance.best_module != best_end:
            j = dominance.best_module
            errs = [r["val_module_errors"][j] for r in metrics]
            ax.plot(epochs, errs, "s--", color="tab:orange", label=f"module {j} (best at epoch {dominance.epoch})")
        also = f" and at epoch {dominance.epoch}" if dominance and dominance.best_module == best_end else ""
        errs = [r["val_module_errors"][best_end] for r in metrics]
        ax.plot(epochs, errs, "^-", color="tab:green", label=f"module {best_end} (best at the end{also})")
    else:  # an older run: only min, mean and max were recorded
        ax.plot(epochs, [r["val_module_error_mean"] for r in metrics], "o-", color="tab:gray", label="module mean")
    ax.plot(epochs, [r["val_error"] for r in metrics], "o-", color="tab:blue", linewidth=2, label="ensemble")
    if dominance is not None:
        color = "tab:red" if dominance.warning else "tab:gray"
        ax.axvline(
            dominance.epoch,
            color=color,
            linestyle=":",
            label="dominance check" + (": fired" if dominance.warning else ""),
        )
    ax.set_ylabel("validation error")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="center right", framealpha=0.9)

    val = [100 * r["val_error"] for r in metrics]
    best = min(range(len(val)), key=val.__getitem__)
    curve.plot(epochs, val, "o-", color="tab:blue", markersize=3)
    curve.plot(
        epochs[best],
        val[best],
        "*",
        color="tab:red",
        markersize=14,
        label=f"best: {val[best]:.2f} % at epoch {epochs[best]}",
    )
    curve.set_ylabel("ensemble validation error (%)")
    curve.set_title("learning curve")
    curve.legend(fontsize="small")
    for a in (ax, curve):
        a.set_xlabel("epoch")
        a.set_xlim(0.5, epochs[-1] + 0.5)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def _test_logits(run: LoadedRun, data_dir: str | None) -> tuple[Any, Any]:
    cfg = run.config
    data, _ = load_data(cfg, data_dir)
    return module_logits(run.model, data.test.x), data.test.y  # (N, M, K), (N,)


def make_report(run_dir: str | Path, out_dir: str | Path | None = None, *, data_dir: str | None = None) -> Report:
    """Write `report.png` and `report.json` for the run in `run_dir` to `out_dir` (default: the run)."""
    run_dir = Path(run_dir)
    run = load_best(run_dir)
    if not get_task(run.task).has_classes:
        raise RunDirError(
            f"{run_dir} is a {run.task} run; the report (errors, entropies, dominance) covers classifiers"
        )
    if not run.metrics:
        raise RunDirError(f"{run_dir}/metrics.jsonl holds no epoch; train the run first, or --resume it")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)

    logits, y = _test_logits(run, data_dir)
    ev = evaluate_logits(logits, y)
    cfg = run.config
    dominance, source = dominance_from_metrics(run.metrics, cfg.dominance_epoch)
    plot = out / "report.png"
    plot_errors(run.metrics, plot, title=f"{cfg.name}, λ={cfg.lam:g}: ensemble vs member error", dominance=dominance)
    report = Report(
        run_dir=run_dir,
        name=cfg.name,
        lam=cfg.lam,
        epochs_done=run.epochs_done,
        best_epoch=run.best_epoch,
        val_error=min(r["val_error"] for r in run.metrics),  # best.pt holds the epoch with the lowest
        test_error=ev.ensemble_error,
        test_module_errors=ev.module_errors.tolist(),
        oracle_accuracy=oracle_accuracy(logits, y),
        entropy=entropy_stats(logits),
        num_classes=logits.shape[-1],
        dominance_epoch=cfg.dominance_epoch,
        dominance=dominance,
        dominance_source=source,
        plot=plot,
    )
    atomic_write_text(json.dumps(report.to_dict(), indent=2) + "\n", out / "report.json")
    return report
