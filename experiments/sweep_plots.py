"""The λ sweep's figures: test error against λ (Fig. 2, with Table 2 beside it) and the NLLs (Fig. 3).

λ is drawn on evenly spaced positions, one per value, since the interesting values crowd near 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quorum.experiments.sweep_results import Cell

__all__ = ["plot_error", "plot_nll"]

_PAPER_OFFSET = 0.15  # paper markers sit this far right of ours, on the same λ


def _by_config(cells: list[Cell]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.config, []).append(c)
    return out


def _lam_axis(ax: Axes, lams: list[float]) -> None:
    ax.set_xticks(range(len(lams)), [f"{lam:g}" for lam in lams])
    ax.set_xlabel("λ")
    ax.grid(alpha=0.3)


def _pct(x: float | None) -> float:
    return 0.0 if x is None else 100 * x


def plot_error(cells: list[Cell], paper: Mapping[str, Mapping[float | None, float]], path: Path) -> None:
    """Test error (%) against λ per configuration, mean ± SE; the paper's numbers as stars (or a dotted line)."""
    groups = _by_config(cells)
    lams = sorted({c.lam for c in cells} | {k for name in groups for k in paper.get(name, {}) if k is not None})
    pos = {lam: i for i, lam in enumerate(lams)}
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, group) in enumerate(groups.items()):
        color = f"C{i}"
        label = f"{name} (any λ: trained once per trial)" if group[0].lam_independent else name
        ax.errorbar(
            [pos[c.lam] for c in group],
            [100 * c.test_error_mean for c in group],
            yerr=[_pct(c.test_error_se) for c in group],
            color=color,
            marker="o",
            capsize=3,
            label=label,
        )
        for lam, value in paper.get(name, {}).items():
            if lam is None:
                ax.axhline(value, color=color, linestyle=":", label=f"{name}, paper (any λ)")
            else:
                ax.plot(pos[lam] + _PAPER_OFFSET, value, "*", color=color, markersize=13, markeredgecolor="black")
        if any(lam is not None for lam in paper.get(name, {})):
            ax.plot([], [], "*", color=color, markersize=13, markeredgecolor="black", label=f"{name}, paper")
    _lam_axis(ax, lams)
    ax.set_ylabel("test error (%)")
    n = max(c.n for c in cells)
    ax.set_title(f"Fashion-MNIST test error at the best validation epoch (mean ± SE, up to {n} trials)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_nll(cells: list[Cell], path: Path) -> None:
    """Ensemble test NLL and the mean of the modules' test NLLs against λ, one panel per configuration."""
    groups = _by_config(cells)
    fig = Figure(figsize=(4.2 * len(groups), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (name, group) in zip(axes, groups.items(), strict=True):
        lams = [c.lam for c in group]
        x = range(len(lams))
        ax.errorbar(
            x,
            [c.test_nll_mean for c in group],
            yerr=[c.test_nll_se or 0.0 for c in group],
            marker="o",
            capsize=3,
            label="ensemble",
        )
        ax.errorbar(
            x,
            [c.module_test_nll_mean for c in group],
            yerr=[c.module_test_nll_se or 0.0 for c in group],
            marker="s",
            capsize=3,
            label="mean of modules",
        )
        ax.set_yscale("log")  # the modules' NLL grows by orders of magnitude as λ -> 1
        _lam_axis(ax, lams)
        ax.set_title(name)
        ax.set_ylabel("test NLL (nats)")
        ax.legend(fontsize="small")
    fig.suptitle("Ensemble NLL and mean module NLL against λ (Webb et al., Fig. 3)")
    fig.savefig(path, dpi=120)
