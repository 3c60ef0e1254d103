"""Anytime accuracy of trained runs: the prefix-aware losses against the modular loss (issue 22).

    quorum anytime sweeps/modular sweeps/prefix-uniform sweeps/dropout --out reports/anytime

For every run of the given sweep folders (`quorum sweep`, any --loss) at its best validation
epoch, from every module's logits computed once in torch:
- the anytime order `quorum export` would ship (exporter/anytime.py: greedy selection on the
  validation split, or the trained index order of a `--loss prefix` run where that validates
  better), and the test accuracy of its prefixes at budgets 1, 2, 4, …, M; for a prefix run also
  those of the greedy order and of the index order;
- the whole ensemble's test error;
- test accuracy with 50 % and 90 % of the modules removed at random (mean over `trials` subsets,
  `experiments.robustness.SubsetScorer`; removed counts as `drop=0.5`, `drop=0.9` count them).

Each run's numbers go to RUN/anytime.json (reused while the run is unchanged); the variants (loss,
prefix weights, λ, schedule, weight decay, augmentation) are aggregated over seeds into
OUT/anytime.json, anytime.md (the table, the paper's Table 2 beside it) and anytime.png (accuracy
against budget).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from quorum.experiments.robustness import SubsetScorer
from quorum.experiments.sweep import PAPER_SETTINGS, PAPER_TABLE2
from quorum.experiments.sweep_results import mean_se
from quorum.exporter.anytime import choose_anytime_order
from quorum.runtime.plan import drop_count
from quorum.trainer.checkpoint import atomic_write_text, read_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import RunDirError
from quorum.trainer.evaluate import module_logits
from quorum.trainer.prefix import prefix_lengths
from quorum.trainer.run import load_best
from quorum.trainer.train import load_data

__all__ = ["DROPS", "RESULT_FILE", "RunAnytime", "Variant", "evaluate_run", "run_anytime", "variant_of"]

log = logging.getLogger(__name__)

RESULT_FILE = "anytime.json"
DROPS = (0.5, 0.9)  # fractions of the modules removed at random


@dataclass
class RunAnytime:
    """One run's anytime numbers at its best validation epoch (RUN/anytime.json)."""

    run: str  # the run directory
    variant: str  # loss, prefix weights, λ, schedule, regularization: the table's row (`variant_of`)
    seed: int
    epochs_run: int  # epochs in metrics.jsonl when computed
    best_epoch: int
    test_error: float  # whole ensemble
    budgets: list[int]  # 1, 2, 4, …, M
    source: str  # the order export ships: greedy | trained
    test_acc: list[float]  # test accuracy of the shipped order's prefixes, per budget
    greedy_test_acc: list[float]
    trained_test_acc: list[float] | None  # the index order's (prefix runs only)
    greedy_val_error: float  # mean validation error over the budgets: what decides the shipped order
    trained_val_error: float | None
    drops: list[float]  # DROPS
    removed: list[int]  # modules removed at each drop
    random_removal_acc: list[float]  # mean test accuracy over the random subsets, per drop
    trials: int  # random subsets per drop


def variant_of(cfg: TrainConfig) -> str:
    """The row a run belongs to, e.g. "prefix (small), λ = 0.99", "prefix (small, μ = 2), λ = 0.99",
    "modular, λ = 1, cosine" or "prefix (uniform), λ = 0.99, cosine, weight decay 0.0005, shifts ≤ 2 px + flips"."""
    loss = cfg.loss
    if cfg.loss in ("prefix", "dropout"):
        scale = "" if cfg.prefix_scale == 1.0 else f", μ = {cfg.prefix_scale:g}"
        loss += f" ({cfg.prefix_weights}{scale})"
    parts = [loss + f", λ = {cfg.lam:g}"]
    if cfg.schedule != "constant":
        parts.append(cfg.schedule)
    if cfg.weight_decay:
        parts.append(f"weight decay {cfg.weight_decay:g}")
    if cfg.use_augment:
        shifts = [f"shifts ≤ {cfg.augment_pad} px"] if cfg.augment_pad else []
        parts.append(" + ".join(shifts + (["flips"] if cfg.augment_flip else [])))
    return ", ".join(parts)


@torch.no_grad()
def evaluate_run(run_dir: Path, *, trials: int = 20, seed: int = 0, data_dir: str | None = None) -> RunAnytime:
    """The anytime numbers of `run_dir`'s best epoch, written to RUN/anytime.json (module docstring)."""
    run = load_best(run_dir)
    cfg = run.config
    if not cfg.task.has_classes:
        raise RunDirError(f"{run_dir}: anytime accuracy needs a classifier; this run has {cfg.task.kind} targets")
    data, _ = load_data(cfg, data_dir)
    val = module_logits(run.model, data.val.x)  # (N, M, K)
    test = module_logits(run.model, data.test.x)
    choice = choose_anytime_order(val, data.val.y, cfg.task, trained=cfg.loss == "prefix")
    m = cfg.modules
    budgets = prefix_lengths(m)
    scorer = SubsetScorer(test.numpy(), data.test.y.numpy())

    def prefix_acc(order: list[int]) -> list[float]:
        return scorer.accuracy([order[:b] for b in budgets]).tolist()

    removed = [drop_count(d, m) for d in DROPS]
    result = RunAnytime(
        run=str(run_dir),
        variant=variant_of(cfg),
        seed=cfg.seed,
        epochs_run=run.epochs_done,
        best_epoch=run.best_epoch,
        test_error=float((test.mean(dim=1).argmax(-1) != data.test.y).double().mean()),
        budgets=budgets,
        source=choice.source,
        test_acc=prefix_acc(choice.order),
        greedy_test_acc=prefix_acc(choice.greedy_order),
        trained_test_acc=None if choice.trained_val is None else prefix_acc(list(range(m))),
        greedy_val_error=float(np.mean(choice.greedy_val)),
        trained_val_error=None if choice.trained_val is None else float(np.mean(choice.trained_val)),
        drops=list(DROPS),
        removed=removed,
        random_removal_acc=[float(scorer.random_removal(r, trials, seed).mean()) for r in removed],
        trials=trials,
    )
    atomic_write_text(json.dumps(asdict(result), indent=2) + "\n", run_dir / RESULT_FILE)
    return result


def _cached(run_dir: Path, trials: int) -> RunAnytime | None:
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    result = RunAnytime(**json.loads(path.read_text()))
    fresh = result.epochs_run == len(read_jsonl(run_dir / "metrics.jsonl")) and result.trials == trials
    if not fresh:
        return None
    result.variant = variant_of(TrainConfig.load(run_dir / "config.json"))  # the row's name as named now
    return result


def _runs(sweep: Path, unfinished: bool) -> list[Path]:
    """The run directories under SWEEP/runs whose training is done (the sweep wrote result.json), or, with
    `unfinished`, every one with a best.pt (its best epoch so far)."""
    marker = "best.pt" if unfinished else "result.json"
    return [p.parent for p in sorted((sweep / "runs").glob(f"*/lam*/seed*/{marker}"))]


@dataclass
class Variant:
    """One row of the table: a variant's numbers, mean and standard error over its seeds."""

    variant: str
    seeds: list[int]
    budgets: list[int]
    test_error: tuple[float, float | None]
    test_acc: list[tuple[float, float | None]]  # the shipped order's, per budget
    random_removal_acc: list[tuple[float, float | None]]  # per drop
    sources: list[str]  # the order shipped, per seed
    epochs: list[tuple[int, int]]  # (epochs trained, best epoch) per seed


def _aggregate(results: Sequence[RunAnytime]) -> list[Variant]:
    groups: dict[tuple[str, int], list[RunAnytime]] = defaultdict(list)
    for r in results:
        groups[(r.variant, r.epochs_run)].append(r)
    lengths: dict[str, set[int]] = defaultdict(set)  # a variant trained for several epoch counts: named with them
    for name, epochs in groups:
        lengths[name].add(epochs)
    out = []
    for (name, epochs), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.seed)
        out.append(
            Variant(
                variant=name if len(lengths[name]) == 1 else f"{name}, {epochs} epochs",
                seeds=[r.seed for r in runs],
                budgets=runs[0].budgets,
                test_error=mean_se([r.test_error for r in runs]),
                test_acc=[mean_se([r.test_acc[i] for r in runs]) for i in range(len(runs[0].budgets))],
                random_removal_acc=[mean_se([r.random_removal_acc[i] for r in runs]) for i in range(len(DROPS))],
                sources=[r.source for r in runs],
                epochs=[(r.epochs_run, r.best_epoch) for r in runs],
            )
        )
    return out


def _pct(v: tuple[float, float | None]) -> str:
    mean, se = v
    return f"{100 * mean:.2f}" + ("" if se is None else f" ± {100 * se:.2f}")


def format_markdown(variants: Sequence[Variant]) -> str:
    """anytime.md: the table of every variant, the paper's Table 2 under it."""
    if not variants:
        return "No finished runs yet.\n"
    budgets = variants[0].budgets
    head = " | ".join(str(b) for b in budgets)
    drops = " | ".join(f"{int(100 * d)} % removed" for d in DROPS)
    lines = [
        "Fashion-MNIST test accuracy (%) of the shipped anytime order's first b modules, test error of the whole "
        "ensemble, and accuracy with modules removed at random (mean over subsets); mean ± standard error over "
        f"seeds, best validation epoch; {datetime.now(UTC).date().isoformat()}.",
        "",
        f"| variant | seeds | epochs (best) | order | test error | {head} | {drops} |",
        "| --- | --- | --- | --- | --- |" + " --- |" * (len(budgets) + len(DROPS)),
    ]
    for v in variants:
        order = ", ".join(f"{v.sources.count(s)}× {s}" for s in sorted(set(v.sources)))
        accs = " | ".join(_pct(a) for a in v.test_acc)
        removal = " | ".join(_pct(a) for a in v.random_removal_acc)
        epochs = ", ".join(f"{n} ({best})" for n, best in v.epochs)
        seeds = ",".join(map(str, v.seeds))
        lines.append(f"| {v.variant} | {seeds} | {epochs} | {order} | {_pct(v.test_error)} | {accs} | {removal} |")
    paper = ", ".join(f"λ = {lam:g}: {err} %" for lam, err in PAPER_TABLE2["256-M-4-H"].items() if lam is not None)
    lines += ["", f"Paper (Webb et al., Table 2), 256-M-4-H test error: {paper} ({PAPER_SETTINGS})."]
    return "\n".join(lines) + "\n"


def _plot(variants: Sequence[Variant], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, v in enumerate(variants):
        mean = np.array([100 * a[0] for a in v.test_acc])
        se = np.array([100 * (a[1] or 0.0) for a in v.test_acc])
        round_ = i // 10 % 3  # past ten variants the colours repeat: another line style and marker tell them apart
        ax.errorbar(
            v.budgets,
            mean,
            yerr=se,
            color=f"C{i % 10}",
            marker="os^"[round_],
            linestyle=("-", "--", ":")[round_],
            ms=4,
            capsize=3,
            label=v.variant,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(variants[0].budgets, [str(b) for b in variants[0].budgets])
    ax.set_xlabel("budget b (modules run: the first b of the shipped anytime order)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("256-M-4-H on Fashion-MNIST: anytime accuracy, mean ± SE over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def run_anytime(
    sweeps: Sequence[str | Path],
    out: str | Path,
    *,
    trials: int = 20,
    seed: int = 0,
    data_dir: str | None = None,
    unfinished: bool = False,
    progress: bool = True,
) -> list[Variant]:
    """Evaluate every finished run of `sweeps` (`unfinished`: also those still training, at their best epoch
    so far), reusing RUN/anytime.json; aggregate, and write OUT/anytime.*."""
    from tqdm.auto import tqdm

    out = Path(out)
    runs = [r for s in sweeps for r in _runs(Path(s), unfinished)]
    results = []
    for run_dir in tqdm(runs, desc="anytime", unit="run", disable=not progress):
        cached = _cached(run_dir, trials)
        results.append(
            cached if cached is not None else evaluate_run(run_dir, trials=trials, seed=seed, data_dir=data_dir)
        )
    variants = _aggregate(results)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "quorum-anytime",
        "version": 1,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "sweeps": [str(s) for s in sweeps],
        "variants": [asdict(v) for v in variants],
        "runs": [asdict(r) for r in results],
    }
    atomic_write_text(json.dumps(doc, indent=2) + "\n", out / "anytime.json")
    atomic_write_text(format_markdown(variants), out / "anytime.md")
    if variants:
        _plot(variants, out / "anytime.png")
    return variants
