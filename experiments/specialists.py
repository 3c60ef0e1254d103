"""Specialist sub-ensembles against the paper's baselines (Webb et al. §4.1, Fig. 5).

    quorum specialists bundles/lam0 bundles/lam0.5 bundles/lam0.9 bundles/lam0.99 bundles/lam1 --out reports/spec

Each class c is a one-vs-all problem (positive when the sub-ensemble's argmax is c), scored by
F1. As in the paper, the test set is split into two halves at random: subsets of k modules are
selected on the first half and every method is reported on the second. Methods, per class:

- one random module: the mean report-half F1 over all modules taken singly (its expectation);
- random k-subset: the mean report-half F1 of `tries` random k-subsets;
- best of `tries` random (the paper): the random k-subset with the best selection-half F1;
- ours (`greedy_specialist`): greedy forward selection on F1 plus single swaps, on the selection half;
- full ensemble: all M modules.

The table averages the report-half F1 over the classes. Module logits come from the bundle's
ONNX graphs through the runtime, so what is measured is what the runtime serves.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quorum.core.datasets import load_raw
from quorum.experiments.robustness import bundle_module_logits
from quorum.exporter.specialists import (
    SPECIALIST_CRITERION,
    best_of_random_specialist,
    ensemble_f1,
    f1_score,
    greedy_specialist,
    one_vs_all_counts,
    random_subsets_f1,
)
from quorum.runtime.engine import Engine
from quorum.trainer.checkpoint import atomic_write_text

__all__ = ["METHODS", "BundleSpecialists", "SpecialistsConfig", "compare_specialists", "run_specialists"]

log = logging.getLogger(__name__)

METHODS = {
    "single": "one random module",
    "random": "random k-subset",
    "best_of_random": "best of 200 random (paper)",
    "ours": "ours (greedy + swaps)",
    "full": "full ensemble",
}


@dataclass(frozen=True)
class SpecialistsConfig:
    k: int = 20  # modules per specialist (the paper: 20)
    tries: int = 200  # random subsets for the paper's best-of and for the random baseline
    seed: int = 0  # seeds the test-set halves and the random subsets
    device: str = "auto"  # ONNX Runtime device for the module logits

    def __post_init__(self) -> None:
        for flag, value in (("-k", self.k), ("--tries", self.tries)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


@dataclass
class BundleSpecialists:
    """One bundle's comparison: report-half F1 per method and class, and their class means."""

    bundle: str
    name: str
    lam: float
    modules: int
    k: int
    f1: dict[str, list[float]]  # method -> F1 per class on the report half
    mean: dict[str, float]  # method -> mean over classes
    subsets: dict[str, list[list[int]]]  # "ours" and "best_of_random" -> chosen module ids per class
    ours_vs_paper: list[float]  # per class: ours minus best-of-random, report half

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random split of range(n) into a selection half and a report half."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


@torch.no_grad()
def compare_specialists(
    logits: np.ndarray, y: np.ndarray, cfg: SpecialistsConfig, *, progress: bool = False, desc: str = "classes"
) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """Report-half F1 of every method for every class, from all module logits (N, M, K) on the test set."""
    sel, rep = halves(len(y), cfg.seed)
    lt = torch.from_numpy(np.ascontiguousarray(logits))
    yt = torch.from_numpy(np.asarray(y)).long()
    l_sel, y_sel, l_rep, y_rep = lt[sel], yt[sel], lt[rep], yt[rep]
    k = min(cfg.k, lt.shape[1])
    singles = l_rep.argmax(dim=-1)  # (N, M): each module alone
    f1: dict[str, list[float]] = {key: [] for key in METHODS}
    subsets: dict[str, list[list[int]]] = {"ours": [], "best_of_random": []}
    for c in tqdm(range(lt.shape[2]), desc=desc, unit="class", disable=not progress):
        f1["single"].append(float(f1_score(*one_vs_all_counts(singles, y_rep, c)).mean()))
        f1["random"].append(float(random_subsets_f1(l_rep, y_rep, c, k, cfg.tries, cfg.seed + 1).mean()))
        paper = best_of_random_specialist(l_sel, y_sel, c, k, cfg.tries, cfg.seed + 2)
        ours = greedy_specialist(l_sel, y_sel, c, k)
        for key, spec in (("best_of_random", paper), ("ours", ours)):
            f1[key].append(ensemble_f1(l_rep, y_rep, c, spec.modules))
            subsets[key].append(spec.modules)
        f1["full"].append(ensemble_f1(l_rep, y_rep, c))
    return f1, subsets


def format_markdown(results: Sequence[BundleSpecialists], cfg: SpecialistsConfig, images: int) -> str:
    head = " | ".join(METHODS.values())
    lines = [
        f"One-vs-all F1 on the report half of the Fashion-MNIST test set ({images - images // 2} images), mean over "
        f"the 10 classes; subsets of k = {cfg.k} chosen on the other half ({images // 2} images); "
        f"{cfg.tries} random subsets; seed {cfg.seed}; {datetime.now(UTC).date().isoformat()}.",
        "",
        f"| bundle | λ | M | {head} | ours − paper (min over classes) |",
        "| --- | --- | --- |" + " --- |" * (len(METHODS) + 1),
    ]
    for r in results:
        cells = " | ".join(f"{r.mean[key]:.4f}" for key in METHODS)
        lines.append(
            f"| {r.name} | {r.lam:g} | {r.modules} | {cells} | "
            f"{r.mean['ours'] - r.mean['best_of_random']:+.4f} ({min(r.ours_vs_paper):+.4f}) |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[BundleSpecialists], path: Path) -> None:
    """Mean F1 of each method against λ (Fig. 5); bundles sorted by λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(results, key=lambda r: r.lam)
    x = np.arange(len(rs))
    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    styles = {"single": ":", "random": "--", "best_of_random": "-.", "ours": "-", "full": (0, (1, 1))}
    for i, (key, label) in enumerate(METHODS.items()):
        ax.plot(x, [r.mean[key] for r in rs], linestyle=styles[key], marker="o", color=f"C{i}", label=label)
    ax.set_xticks(x, [f"λ={r.lam:g}" + ("" if [q.lam for q in rs].count(r.lam) == 1 else f"\n{r.name}") for r in rs])
    ax.set_ylabel("one-vs-all test F1, mean over classes")
    ax.set_title(f"Specialist sub-ensembles of k = {rs[0].k} modules (report half of the test set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_specialists(
    bundles: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    cfg: SpecialistsConfig,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[list[BundleSpecialists], str]:
    """Compare specialist selections on every bundle; write specialists.json, .md and .png to `out`."""
    out = Path(out)
    x_raw, y = load_raw(data_dir)["test"]
    if limit is not None:
        x_raw, y = x_raw[:limit], y[:limit]
    engines = [Engine.load(b, device=cfg.device) for b in bundles]  # verify every bundle before the slow part
    results = []
    for bundle, engine in zip(bundles, engines, strict=True):
        ids = sorted(engine.healthy_ids)
        if len(ids) < engine.num_modules:
            gone = engine.num_modules - len(ids)
            log.warning("%s: %d of %d modules are quarantined; comparing the rest", bundle, gone, engine.num_modules)
        logits = bundle_module_logits(engine, x_raw, ids, progress)
        f1, picked = compare_specialists(logits, y, cfg, progress=progress, desc=f"{engine.manifest.name}: classes")
        results.append(
            BundleSpecialists(
                bundle=str(bundle),
                name=engine.manifest.name,
                lam=engine.manifest.training.lam,
                modules=len(ids),
                k=min(cfg.k, len(ids)),
                f1=f1,
                mean={key: float(np.mean(v)) for key, v in f1.items()},
                subsets={key: [[ids[j] for j in s] for s in v] for key, v in picked.items()},
                ours_vs_paper=[a - b for a, b in zip(f1["ours"], f1["best_of_random"], strict=True)],
            )
        )
    markdown = format_markdown(results, cfg, len(y))
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "quorum-specialists",
        "version": 1,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "images": len(y),
        "methods": METHODS,
        "criterion": SPECIALIST_CRITERION.replace("validation split", "selection half"),
        "bundles": [r.to_dict() for r in results],
    }
    atomic_write_text(json.dumps(doc, indent=2) + "\n", out / "specialists.json")
    atomic_write_text(markdown, out / "specialists.md")
    plot(results, out / "specialists.png")
    return results, markdown
