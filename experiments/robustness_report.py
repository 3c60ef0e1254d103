"""The `quorum robustness` command: evaluate bundles, write robustness.json and the figure, and
format the printed table and the PASS/FAIL lines.

    reports = run_robustness(["bundles/lam0", "bundles/lam099"], "reports/robust",
                             RobustnessConfig(trials=20), [Requirement.parse("drop=0.5:acc>=0.85")])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from quorum.core.datasets import load_raw
from quorum.experiments.robustness import BundleReport, Requirement, RobustnessConfig, evaluate
from quorum.runtime.engine import Engine
from quorum.runtime.errors import InvalidRequest

__all__ = ["format_checks", "format_table", "plot_reports", "run_robustness"]

JSON_FILE = "robustness.json"
PNG_FILE = "robustness.png"


def run_robustness(
    bundles: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: RobustnessConfig | None = None,
    requirements: Sequence[Requirement] = (),
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[BundleReport]:
    """Evaluate every bundle on Fashion-MNIST; write `robustness.json` and `robustness.png` to `out_dir`."""
    cfg = cfg or RobustnessConfig()
    if not bundles:
        raise InvalidRequest("give at least one bundle directory")
    x_raw, labels = load_raw(data_dir)[cfg.split]
    if cfg.limit is not None:
        x_raw, labels = x_raw[: cfg.limit], labels[: cfg.limit]
    engines = [Engine.load(b, device=cfg.device) for b in bundles]  # every bundle verified before the slow part
    for engine in engines:
        for req in requirements:
            try:
                req.removed(len(engine.healthy_ids))
            except InvalidRequest as e:
                raise InvalidRequest(f"{engine.bundle_dir}: {e}") from None
    reports = [evaluate(e, x_raw, labels, cfg, requirements, progress=progress) for e in engines]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "quorum-robustness",
        "version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "split": cfg.split,
        "images": len(labels),
        "trials": cfg.trials,
        "seed": cfg.seed,
        "requirements": [r.text for r in requirements],
        "passed": all(c.passed for r in reports for c in r.checks),
        "bundles": [asdict(r) for r in reports],
    }
    (out / JSON_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    plot_reports(reports, out / PNG_FILE, split=cfg.split)
    return reports


def _labels(reports: Sequence[BundleReport]) -> list[str]:
    """Manifest names, or paths where two bundles share a name."""
    names = [r.name for r in reports]
    return [r.name if names.count(r.name) == 1 else r.path for r in reports]


def plot_reports(reports: Sequence[BundleReport], path: str | os.PathLike[str], split: str = "test") -> None:
    """(a) accuracy against modules removed at random; (b) anytime prefix against random subsets by budget;
    (c) the prefix's margin over the random mean by budget, with its 95 % interval paired by image.

    One legend below the panels names the bundles by colour; line styles are explained in (b)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, StrMethodFormatter

    from quorum.experiments.robustness import (
        MARGIN_Z,  # imported here: quorum.experiments.robustness imports this module
    )

    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(18, 5), constrained_layout=True)
    handles = []
    for i, (report, label) in enumerate(zip(reports, _labels(reports), strict=True)):
        color = f"C{i % 10}"
        removed = [p.removed for p in report.curve]
        budget = [p.modules for p in report.curve]
        mean, lo, hi = ([getattr(p, k) for p in report.curve] for k in ("mean", "min", "max"))
        handles.append(Line2D([], [], color=color, marker=".", label=f"{label} (λ={report.lam:g}, M={report.modules})"))
        ax_a.plot(removed, mean, color=color, marker=".")
        ax_a.fill_between(removed, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax_b.plot(budget, [p.ordered for p in report.curve], color=color, marker=".")
        ax_b.plot(budget, mean, color=color, linestyle="--")
        ax_b.fill_between(budget, lo, hi, color=color, alpha=0.15, linewidth=0)
        inner = [p for p in report.curve if p.removed > 0]  # the whole ensemble has no margin
        ax_c.errorbar(
            [p.modules for p in inner],
            [100 * (p.ordered - p.mean) for p in inner],
            yerr=[100 * MARGIN_Z * p.margin_se for p in inner],
            color=color,
            marker=".",
            capsize=2,
        )
    ylabel = f"{split} accuracy"
    ax_a.set(xlabel="modules removed at random", ylabel=ylabel, title="(a) removal: mean and min–max over trials")
    ax_b.set(xscale="log", xlabel="modules evaluated (budget)", ylabel=ylabel)
    ax_b.set_title("(b) anytime-order prefix vs random subsets")
    ax_b.legend(
        handles=[
            Line2D([], [], color="gray", marker=".", label="anytime-order prefix"),
            Line2D([], [], color="gray", linestyle="--", label="random subsets, mean"),
            Patch(color="gray", alpha=0.3, label="random subsets, min–max"),
        ],
        fontsize="small",
    )
    ax_c.axhline(0, color="black", linewidth=0.8)
    # symlog: margins of tens of points at one module and of a few images near M on one axis
    ax_c.set(xscale="log", xlabel="modules evaluated (budget)", ylabel="ordered − random mean (accuracy points)")
    ax_c.set_yscale("symlog", linthresh=0.5, linscale=1.5)
    ax_c.yaxis.set_major_locator(FixedLocator([-2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50]))
    ax_c.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax_c.set_title(f"(c) order − random mean, ±{MARGIN_Z:g} SE paired by image")
    for ax in (ax_b, ax_c):
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1, 10, 100 rather than 10^0, 10^1, 10^2
    for ax in (ax_a, ax_b, ax_c):
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(reports: Sequence[BundleReport]) -> str:
    """A few rows per bundle (removed 0, 50 %, 90 %, M - 1) and the anytime verdict."""
    from quorum.experiments.robustness import (
        MARGIN_Z,  # imported here: quorum.experiments.robustness imports this module
    )

    labels = _labels(reports)
    width = max(6, *map(len, labels))
    head = f"{'bundle':<{width}}  {'λ':>5}  {'removed':>7}  {'left':>4}  {'random mean ± std':>17}  "
    lines = [head + f"{'min':>6}  {'max':>6}  {'ordered':>7}  {'margin ± 95 %':>16}"]
    for report, label in zip(reports, labels, strict=True):
        for p in report.summary:
            lines.append(
                f"{label:<{width}}  {report.lam:>5g}  {p.removed:>7}  {p.modules:>4}  "
                f"{p.mean:>8.4f} ± {p.std:<6.4f}  {p.min:>6.4f}  {p.max:>6.4f}  {p.ordered:>7.4f}  "
                + (f"{p.ordered - p.mean:>+7.4f} ± {MARGIN_Z * p.margin_se:<6.4f}" if p.removed else f"{'—':>16}")
            )
        losses = [p for p in report.curve if p.removed > 0 and p.ordered <= p.mean]
        budgets = ", ".join(str(p.modules) for p in losses)
        verdict = (
            "yes"
            if report.ordered_beats_random
            else f"no: it loses at {len(losses)} of {len(report.curve) - 1} budgets ({budgets})"
        )
        lines.append(f"{label}: anytime order beats the random mean at every budget < {report.modules}: {verdict}")
        if not report.ordered_beats_random:
            worse = ", ".join(map(str, report.ordered_worse_at)) or "none"
            lines.append(f"{label}: budgets where it is worse by more than the 95 % interval: {worse}")
    return "\n".join(lines)


def format_checks(reports: Sequence[BundleReport]) -> list[str]:
    """One PASS/FAIL line per (bundle, requirement)."""
    lines = []
    for report, label in zip(reports, _labels(reports), strict=True):
        for c in report.checks:
            verdict = "PASS" if c.passed else "FAIL"
            lines.append(
                f"{verdict} {label}: {c.requirement}: measured {c.metric} {c.measured:.4f} "
                f"({c.removed} of {report.modules} modules removed)"
            )
    return lines
