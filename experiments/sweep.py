"""The λ sweep of Webb et al. §4.1 (Fig. 2, Table 2): train every (configuration, λ, trial), aggregate.

    quorum sweep --out sweeps/fig2 --configs 256-M-4-H,1-M-1024-H --lams 0,0.95,0.99,1 --trials 3

Each run is a normal run directory DIR/runs/<config>/lam<λ>/seed<s>/ (`quorum export` works on
it) plus result.json, its test metrics at the best validation epoch (trainer/sweep_results.py).
Trial t uses seed `seed + t`, which fixes the train/validation split and the initial weights:
every λ of a trial starts from the same weights. A finished run is reused and an interrupted
one resumed, and the tables are aggregated from every result.json under DIR/runs, so several
invocations into one DIR (e.g. with different --lams) fill one table.

With M = 1 the modular loss is the one module's CE for every λ, so such a configuration is
trained once per trial, at λ = 1 (lam1/), and reported in every λ column.

Outputs in DIR: sweep.json (every run and every cell), sweep.md (the table), sweep.png (test
error against λ: Fig. 2, with Table 2 beside it) and sweep_nll.png (ensemble and mean module
NLL against λ: Fig. 3).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from quorum.experiments.sweep_results import Cell, RunResult, aggregate, collect_results, compute_result, read_result
from quorum.trainer.checkpoint import atomic_write_text, read_jsonl
from quorum.trainer.config import TrainConfig, default_lr
from quorum.trainer.data import load_raw
from quorum.trainer.errors import ConfigError, RunDirError, TrainerError
from quorum.trainer.loss import check_lambda
from quorum.trainer.train import resolve_device, train

__all__ = [
    "DEFAULT_CONFIGS",
    "DEFAULT_LAMS",
    "PAPER_TABLE2",
    "SHARED_LAM",
    "SweepConfig",
    "SweepReport",
    "config_name",
    "format_markdown",
    "lam_dirname",
    "parse_config",
    "parse_configs",
    "parse_lams",
    "run_sweep",
]

log = logging.getLogger(__name__)

# Webb et al., "Joint Training of Neural Network Ensembles", Table 2: Fashion-MNIST test error (%)
# at the best validation epoch; 200 epochs, 5 trials, learning rate tuned per configuration and λ.
# Key None: any λ (one module, so the modular loss does not depend on λ).
PAPER_TABLE2: dict[str, dict[float | None, float]] = {
    "1-M-1024-H": {None: 10.2},
    "256-M-4-H": {0.0: 16.3, 0.95: 10.3, 1.0: 10.5},
}
PAPER_SETTINGS = "200 epochs, 5 trials, learning rate tuned per configuration and λ"
DEFAULT_CONFIGS = ("1-M-1024-H", "16-M-64-H", "64-M-16-H", "256-M-4-H")  # §4.1, ~815K parameters each
DEFAULT_LAMS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # §4.1
SHARED_LAM = 1.0  # λ at which an M = 1 configuration is trained and stored: its joint CE term alone

_MLP = re.compile(r"(\d+)-M-(\d+)-H", re.IGNORECASE)
_CONVNET = re.compile(r"(\d+)-M-convnet-(\d+(?:\.\d+)*)(?:-s(\d+(?:\.\d+)*))?", re.IGNORECASE)


def parse_config(text: str) -> dict[str, Any]:
    """The TrainConfig options of a configuration name: 256-M-4-H (256 MLP modules of 4 hidden
    units) or 16-M-convnet-16.32.32-s2.2.1 (16 ConvNets of 3x3 layers of 16, 32, 32 channels,
    strides 2, 2, 1; strides default to 1)."""
    text = text.strip()
    if (m := _MLP.fullmatch(text)) and int(m[1]) >= 1 and int(m[2]) >= 1:
        return {"modules": int(m[1]), "hidden": int(m[2])}
    if (c := _CONVNET.fullmatch(text)) and int(c[1]) >= 1:
        filters = c[2].replace(".", ",")
        strides = c[3].replace(".", ",") if c[3] else None
        if strides is not None and len(strides.split(",")) != len(filters.split(",")):
            raise ConfigError(f"--configs: {text!r} needs one stride per layer")
        return {"arch": "convnet", "modules": int(c[1]), "filters": filters, "strides": strides}
    raise ConfigError(
        f"--configs: {text!r} is not a configuration; write M-M-H-H with M, H >= 1, e.g. 256-M-4-H (256 modules "
        "of 4 hidden units), or M-M-convnet-F1.F2…[-sS1.S2…], e.g. 16-M-convnet-16.32.32-s2.2.1"
    )


def config_name(text: str) -> str:
    """The canonical name of a configuration (what TrainConfig.name gives its runs)."""
    return TrainConfig(**parse_config(text)).name


def parse_configs(text: str) -> list[str]:
    """Comma-separated configuration names -> canonical names, duplicates dropped, order kept."""
    return list(dict.fromkeys(config_name(part) for part in text.split(",")))


def parse_lams(text: str) -> list[float]:
    """Comma-separated λ values in [0, 1] -> sorted, duplicates dropped."""
    lams = []
    for part in text.split(","):
        try:
            lam = float(part)
        except ValueError:
            raise ConfigError(
                f"--lams: {part.strip()!r} is not a number; give λ values in [0, 1] separated by commas, "
                "e.g. 0,0.5,0.95,1"
            ) from None
        try:
            lams.append(check_lambda(lam))
        except ConfigError as e:
            raise ConfigError(f"--lams: {e}") from None
    return sorted(set(lams))


def lam_dirname(lam: float) -> str:
    """lam0, lam0.95, lam1: the shortest text that reads back as the same float."""
    text = repr(float(lam))
    return "lam" + text.removesuffix(".0")


@dataclass
class SweepConfig:
    configs: Sequence[str] = DEFAULT_CONFIGS  # configuration names, e.g. 256-M-4-H
    lams: Sequence[float] = DEFAULT_LAMS  # λ values, each in [0, 1]
    trials: int = 3  # trial t trains with seed `seed + t` (split and init)
    epochs: int = 10  # epochs per run; test error is taken at the best validation epoch
    patience: int | None = None  # early stopping: epochs without a better validation error
    seed: int = 0  # seed of trial 0
    lr: float | None = None  # SGD learning rate; None -> the trainer's default, 0.02·M
    device: str = "auto"  # auto | cpu | cuda
    data_dir: str | None = None  # Fashion-MNIST IDX folder; None -> $QUORUM_DATA_DIR, then Debian's
    subset: int | None = None  # train on only this many images (smoke tests)
    jobs: int = 1  # trainings at once, in worker processes
    loss: str = "modular"  # --loss of every run: modular | prefix | dropout (a sweep folder per loss)
    prefix_weights: str = "uniform"  # prefix, dropout: weights of the prefix lengths (trainer/prefix.py)
    prefix_scale: float = 1.0  # prefix, dropout: μ, the prefix term's weight against L_λ
    schedule: str = "constant"  # learning-rate schedule of every run: constant | cosine
    warmup_epochs: float = 1.0  # cosine: epochs of linear warmup
    weight_decay: float = 0.0  # every run's --weight-decay
    augment: bool | None = None  # every run's --augment (flip-and-crop of the training images); None: off
    augment_pad: int = 4  # --augment: the crop's zero padding, the largest shift in pixels
    augment_flip: bool = True  # --augment: mirror half the images
    command: str = ""  # the command line, recorded in every new run's config.json

    def __post_init__(self) -> None:
        self.configs = tuple(dict.fromkeys(map(config_name, self.configs)))
        self.lams = tuple(sorted({check_lambda(float(lam)) for lam in self.lams}))
        if not self.configs or not self.lams:
            raise ConfigError("a sweep needs at least one configuration (--configs) and one λ (--lams)")
        for name in ("trials", "epochs", "jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"--subset must be >= 1, got {self.subset}")

    def train_config(self, name: str, lam: float, seed: int) -> TrainConfig:
        opts = parse_config(name)
        return TrainConfig(
            **opts,
            lam=SHARED_LAM if opts["modules"] == 1 else lam,
            epochs=self.epochs,
            lr=self.lr,
            loss=self.loss,
            prefix_weights=self.prefix_weights,
            prefix_scale=self.prefix_scale,
            schedule=self.schedule,
            warmup_epochs=self.warmup_epochs,
            weight_decay=self.weight_decay,
            augment=self.augment,
            augment_pad=self.augment_pad,
            augment_flip=self.augment_flip,
            seed=seed,
            subset=self.subset,
            patience=self.patience,
            data_dir=self.data_dir,
            device=self.device,
            command=self.command,
        )


@dataclass
class _Job:
    run_dir: Path
    cfg: TrainConfig
    train: bool  # False: training is done, only result.json is missing or stale
    resume: bool  # the run directory already holds this run
    progress: bool  # per-run progress bars

    def describe(self) -> str:
        lam = "any λ" if self.cfg.modules == 1 else f"λ={self.cfg.lam:g}"
        return f"{self.cfg.name} {lam} seed {self.cfg.seed}"


@dataclass
class SweepReport:
    out: Path
    cells: list[Cell]  # every (configuration, λ) found under out/runs
    runs: list[RunResult]  # every finished run found under out/runs
    trained: int  # runs trained (or resumed) by this invocation
    reused: int  # runs this invocation found finished, with their result
    failures: list[str] = field(default_factory=list)  # "<run>: <error>" for runs that failed
    markdown: str = ""  # the table of sweep.md


def _finished(cfg: TrainConfig, metrics: list[dict[str, object]]) -> bool:
    """Trained to cfg.epochs, or stopped early by cfg.patience (as train() would have)."""
    if len(metrics) >= cfg.epochs:
        return True
    if cfg.patience is None or not metrics:
        return False
    best = min(range(len(metrics)), key=lambda i: float(metrics[i]["val_error"])) + 1  # type: ignore[arg-type]
    return len(metrics) - best >= cfg.patience


def _plan(cfg: SweepConfig, runs_root: Path, progress: bool) -> tuple[list[_Job], int]:
    """The runs that need training or a result, trial by trial; and how many are reused as they are."""
    jobs, reused = [], 0
    for trial in range(cfg.trials):
        for name in cfg.configs:
            lams = [SHARED_LAM] if parse_config(name)["modules"] == 1 else cfg.lams
            for lam in lams:
                want = cfg.train_config(name, lam, cfg.seed + trial)
                run_dir = runs_root / name / lam_dirname(lam) / f"seed{want.seed}"
                if not (run_dir / "config.json").exists():
                    jobs.append(_Job(run_dir, want, train=True, resume=False, progress=progress))
                    continue
                try:
                    stored = TrainConfig.load(run_dir / "config.json").resumed_with(
                        {k: v for k, v in want.to_dict().items() if k != "command"}
                    )
                except RunDirError as e:
                    raise RunDirError(f"{run_dir}: {e}") from None
                metrics = read_jsonl(run_dir / "metrics.jsonl")
                if not _finished(stored, metrics):
                    jobs.append(_Job(run_dir, stored, train=True, resume=True, progress=progress))
                elif read_result(run_dir) is None:
                    jobs.append(_Job(run_dir, stored, train=False, resume=True, progress=progress))
                else:
                    reused += 1
                    if len(metrics) > cfg.epochs:
                        log.warning(
                            "%s ran %d epochs (> --epochs %d); reused as it is", run_dir, len(metrics), cfg.epochs
                        )
    return jobs, reused


def _run_job(job: _Job) -> RunResult:
    """Train (or resume) one run if needed, then compute its result.json. Runs in a worker when --jobs > 1."""
    if job.train:
        train(job.cfg, job.run_dir, resume=job.resume, progress=job.progress)
    return compute_result(job.run_dir)


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _run_jobs(jobs: list[_Job], cfg: SweepConfig, progress: bool) -> list[tuple[_Job, str]]:
    """Run every job; a run that fails with a TrainerError (e.g. divergence) is reported, not fatal."""
    failures: list[tuple[_Job, str]] = []
    if cfg.jobs == 1:
        for i, job in enumerate(jobs, 1):
            log.info("[%d/%d] %s -> %s", i, len(jobs), job.describe(), job.run_dir)
            try:
                _run_job(job)
            except ConfigError:
                raise  # bad input: every run would fail the same way
            except TrainerError as e:
                failures.append((job, str(e)))
                log.error("%s failed: %s", job.describe(), e)
        return failures

    # Several small trainings at once leave no device idle; on a CPU they split its cores.
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs) if resolve_device(cfg.device).type == "cpu" else None
    pool = ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(_run_job, job): job for job in jobs}
        bar = tqdm(as_completed(futures), total=len(futures), desc="sweep", unit="run", disable=not progress)
        for fut in bar:
            job = futures[fut]
            try:
                fut.result()
            except ConfigError:
                raise
            except TrainerError as e:
                failures.append((job, str(e)))
                bar.set_postfix(failed=len(failures))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failures


def _fmt_error(cell: Cell | None, trials: int) -> str:
    if cell is None:
        return "—"
    se = "" if cell.test_error_se is None else f" ± {100 * cell.test_error_se:.2f}"
    n = "" if cell.n == trials else f" (n={cell.n})"
    return f"{100 * cell.test_error_mean:.2f}{se} %{n}"


def _fmt_paper(name: str) -> str:
    paper = PAPER_TABLE2.get(name, {})
    return ", ".join(f"{v} %" + (" (any λ)" if k is None else f" (λ={k:g})") for k, v in paper.items()) or "—"


def format_markdown(cells: list[Cell], runs: list[RunResult]) -> str:
    """sweep.md: a header line, the test-error table (with Table 2 beside it), and the NLL table."""
    if not cells:
        return "No finished runs yet.\n"
    lams = sorted({c.lam for c in cells})
    names = list(dict.fromkeys(c.config for c in cells))
    by_key = {(c.config, c.lam): c for c in cells}
    trials = max(c.n for c in cells)
    seeds = sorted({r.seed for r in runs})
    epochs = ", ".join(str(e) for e in sorted({r.epochs for r in runs}))
    default = all(abs(r.lr - default_lr(r.modules)) < 1e-12 for r in runs)
    lr = "0.02·M (the trainer's default)" if default else ", ".join(f"{x:g}" for x in sorted({r.lr for r in runs}))
    devices, torches = "; ".join(sorted({r.device for r in runs})), ", ".join(sorted({r.torch for r in runs}))
    header = (
        f"Fashion-MNIST test error at the best validation epoch, mean ± standard error over trials. "
        f"{epochs} epochs, {trials} trials (seeds {', '.join(map(str, seeds))}), SGD lr {lr}, momentum 0.9, "
        f"batch 100; {devices}; torch {torches}; "
        f"{datetime.now(UTC).date().isoformat()}. Paper (Webb et al., Table 2): {PAPER_SETTINGS}."
    )
    cols = " | ".join(f"λ = {lam:g}" for lam in lams)
    lines = [header, "", f"| configuration | {cols} | paper (Table 2) |", "| --- |" + " --- |" * (len(lams) + 1)]
    for name in names:
        shared = any(c.lam_independent for c in cells if c.config == name)
        label = f"{name} (M = 1: trained once per trial, same for every λ)" if shared else name
        row = " | ".join(_fmt_error(by_key.get((name, lam)), trials) for lam in lams)
        lines.append(f"| {label} | {row} | {_fmt_paper(name)} |")
    lines += [
        "",
        "Ensemble test NLL / mean of the modules' test NLLs (nats), mean over trials (the paper's Fig. 3):",
        "",
    ]
    lines += [f"| configuration | {cols} |", "| --- |" + " --- |" * len(lams)]
    for name in names:
        nll = [by_key.get((name, lam)) for lam in lams]
        row = " | ".join("—" if c is None else f"{c.test_nll_mean:.3f} / {c.module_test_nll_mean:.3f}" for c in nll)
        lines.append(f"| {name} | {row} |")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, cfg: SweepConfig, report: SweepReport) -> None:
    from quorum.experiments.sweep_plots import plot_error, plot_nll  # matplotlib only when writing

    doc = {
        "format": "quorum-sweep",
        "version": 1,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": cfg.command,
        "paper": {
            "source": "Webb et al., Joint Training of Neural Network Ensembles, Table 2",
            "settings": PAPER_SETTINGS,
            "test_error_percent": {
                name: {"any" if lam is None else f"{lam:g}": v for lam, v in row.items()}
                for name, row in PAPER_TABLE2.items()
            },
        },
        "note": "M = 1 configurations are trained once per trial (at λ = 1) and reported for every λ "
        "(lam_independent: true): their modular loss does not depend on λ.",
        "aggregate": [c.to_dict() for c in report.cells],
        "runs": [r.to_dict() for r in report.runs],
    }
    atomic_write_text(json.dumps(doc, indent=2) + "\n", out / "sweep.json")
    atomic_write_text(report.markdown, out / "sweep.md")
    plot_error(report.cells, PAPER_TABLE2, out / "sweep.png")
    plot_nll(report.cells, out / "sweep_nll.png")


def run_sweep(cfg: SweepConfig, out: str | Path, *, progress: bool = True) -> SweepReport:
    """Train what is missing of the sweep `cfg` in `out`, then write sweep.json, sweep.md and the plots."""
    out = Path(out)
    resolve_device(cfg.device)  # --device cuda without CUDA: say so before any run starts
    load_raw(cfg.data_dir)  # a missing dataset: say so once, not once per run
    runs_root = out / "runs"
    jobs, reused = _plan(cfg, runs_root, progress=progress and cfg.jobs == 1)
    log.info("sweep %s: %d runs to train or evaluate, %d reused", out, len(jobs), reused)
    failures = _run_jobs(jobs, cfg, progress)

    runs = collect_results(runs_root)
    columns = set(cfg.lams) | {r.lam for r in runs if not r.lam_independent}
    cells = aggregate(runs, columns)
    failed = {id(job) for job, _ in failures}
    trained = sum(job.train and id(job) not in failed for job in jobs)
    report = SweepReport(out, cells, runs, trained, reused, [f"{job.run_dir}: {msg}" for job, msg in failures])
    report.markdown = format_markdown(cells, runs)
    _write_outputs(out, cfg, report)
    return report
