"""Results of a λ sweep: one `result.json` per run directory, aggregated over trials.

A run's result holds its test metrics at the best validation epoch (the weights in best.pt),
computed once after training and reused while the run's metrics.jsonl is unchanged. The
aggregate of one (configuration, λ) cell is the mean over trials and its standard error
std(ddof=1)/sqrt(n), none for a single trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from quorum.trainer.checkpoint import atomic_write_text, read_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.data import load_raw
from quorum.trainer.errors import RunDirError
from quorum.trainer.evaluate import evaluate_logits, module_logits
from quorum.trainer.models import arch_info
from quorum.trainer.run import load_best
from quorum.trainer.train import build_model, resolve_device

__all__ = [
    "RESULT_FILE",
    "Cell",
    "RunResult",
    "aggregate",
    "collect_results",
    "compute_result",
    "initial_state_sha256",
    "mean_se",
    "read_result",
    "state_sha256",
]

RESULT_FILE = "result.json"


@dataclass
class RunResult:
    """What result.json holds: one trained run's test metrics at its best validation epoch."""

    config: str  # the papers' naming, e.g. 256-M-4-H, 16-M-convnet-16.32.32-s2.2.1
    modules: int  # M
    hidden: int | str | None  # H of an MLP (or its widths, "64,64"); None for other architectures
    lam: float  # λ the run was trained with
    lam_independent: bool  # M = 1: the loss is the same for every λ; this run stands for all of them
    seed: int  # seeds the split and the init: trial t of a sweep with --seed s has seed s + t
    lr: float  # SGD learning rate used
    epochs: int  # epochs asked for
    epochs_run: int  # epochs trained (fewer with early stopping)
    best_epoch: int  # 1-based epoch of best.pt, the lowest validation error
    val_error: float  # validation error of the best epoch
    test_error: float  # ensemble test error of the best epoch
    test_nll: float  # ensemble test NLL (nats): CE of softmax(mean of module logits)
    module_test_nll: float  # mean over modules of each module's test NLL (the paper's Fig. 3)
    module_test_error: float  # mean over modules of each module's test error
    seconds: float  # training time summed over epochs, validation included
    init_sha256: str  # hash of the weights the run started from; equal for every λ of a seed
    device: str  # where it trained, e.g. "cpu (AMD EPYC, 2 threads)"
    torch: str  # torch version that computed the result
    written: str  # ISO time result.json was written

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        names = {f.name for f in fields(cls)}
        if missing := names - set(data):
            raise ValueError(f"missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names and float values, in order."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def initial_state_sha256(cfg: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> str:
    """Hash of the weights `train(cfg)` starts from: it seeds torch with cfg.seed, then builds the model.

    The global RNG state of the caller is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, in_shape, num_classes)
    return state_sha256(model.state_dict())


@lru_cache(maxsize=2)
def _raw_test(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    return load_raw(data_dir)["test"]


def _device_name(device: str) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    model = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def compute_result(run_dir: Path, *, data_dir: str | None = None) -> RunResult:
    """Test metrics of the run's best epoch; written to run_dir/result.json and returned.

    The test images are normalized with the run's own statistics (those stored in best.pt and
    exported to the manifest), exactly as `load_fashion_mnist` does for the run's seed and subset.
    """
    run = load_best(run_dir)
    cfg = run.config
    x_raw, y_raw = _raw_test(data_dir if data_dir is not None else cfg.data_dir)
    x = run.norm.apply(torch.from_numpy(x_raw)).reshape(len(y_raw), *run.in_shape)
    y = torch.from_numpy(y_raw.astype(np.int64))
    logits = module_logits(run.model, x)  # (N, M, K)
    ev = evaluate_logits(logits, y)
    N, M, _ = logits.shape
    module_nll = F.cross_entropy(logits.transpose(1, 2), y.unsqueeze(1).expand(N, M))  # mean over N*M
    result = RunResult(
        config=cfg.name,
        modules=cfg.modules,
        hidden=cfg.hidden if "hidden" in arch_info(cfg.arch).options else None,
        lam=cfg.lam,
        lam_independent=cfg.modules == 1,
        seed=cfg.seed,
        lr=cfg.learning_rate,
        epochs=cfg.epochs,
        epochs_run=run.epochs_done,
        best_epoch=run.best_epoch,
        val_error=float(run.metrics[run.best_epoch - 1]["val_error"]),
        test_error=ev.ensemble_error,
        test_nll=ev.ensemble_nll,
        module_test_nll=float(module_nll),
        module_test_error=float(ev.module_errors.mean()),
        seconds=round(sum(r["seconds"] for r in run.metrics), 2),
        init_sha256=initial_state_sha256(cfg, run.in_shape, len(run.class_names)),
        device=_device_name(cfg.device),
        torch=torch.__version__,
        written=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write_text(json.dumps(result.to_dict(), indent=2) + "\n", run_dir / RESULT_FILE)
    return result


def read_result(run_dir: Path) -> RunResult | None:
    """The run's result.json if it describes the run as it is now (no epochs trained since), else None."""
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = RunResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise RunDirError(f"cannot read {path} ({e}); delete it and the sweep computes it again") from e
    return result if result.epochs_run == len(read_jsonl(run_dir / "metrics.jsonl")) else None


def collect_results(runs_root: Path) -> list[RunResult]:
    """Every up-to-date result.json under runs_root/<config>/lam<λ>/seed<s>/."""
    found = (read_result(p.parent) for p in sorted(runs_root.glob(f"*/lam*/seed*/{RESULT_FILE}")))
    return [r for r in found if r is not None]


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error std(ddof=1)/sqrt(n); the error is None for a single value."""
    if not values:
        raise ValueError("mean_se of no values")
    mean = math.fsum(values) / len(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, se


@dataclass
class Cell:
    """One (configuration, λ) entry of the sweep's table: statistics over its trials."""

    config: str  # e.g. 256-M-4-H
    modules: int  # M
    hidden: int | str | None  # H of an MLP (or its widths, "64,64"); None for other architectures
    lam: float  # the table's λ column
    lam_independent: bool  # M = 1: the same runs (trained once per trial) fill every λ column
    n: int  # trials
    seeds: list[int]  # their seeds
    best_epochs: list[int]  # best validation epoch of each trial
    epochs: list[int]  # epochs asked for, over the trials (one value unless runs were mixed)
    test_error_mean: float
    test_error_se: float | None  # None when n = 1
    test_nll_mean: float
    test_nll_se: float | None
    module_test_nll_mean: float
    module_test_nll_se: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cell(runs: list[RunResult], lam: float) -> Cell:
    runs = sorted(runs, key=lambda r: r.seed)
    err, err_se = mean_se([r.test_error for r in runs])
    nll, nll_se = mean_se([r.test_nll for r in runs])
    mod, mod_se = mean_se([r.module_test_nll for r in runs])
    first = runs[0]
    return Cell(
        config=first.config,
        modules=first.modules,
        hidden=first.hidden,
        lam=lam,
        lam_independent=first.lam_independent,
        n=len(runs),
        seeds=[r.seed for r in runs],
        best_epochs=[r.best_epoch for r in runs],
        epochs=sorted({r.epochs for r in runs}),
        test_error_mean=err,
        test_error_se=err_se,
        test_nll_mean=nll,
        test_nll_se=nll_se,
        module_test_nll_mean=mod,
        module_test_nll_se=mod_se,
    )


def aggregate(results: Iterable[RunResult], lams: Iterable[float]) -> list[Cell]:
    """One cell per (configuration, λ), configurations by (M, H, name), λ ascending.

    A λ-independent configuration (M = 1) gets a cell for every λ in `lams`, all from the same runs.
    """
    # Keyed by configuration name too: two ConvNets of the same M differ only there.
    groups: dict[tuple[int, int | str, str, float | None], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[(r.modules, r.hidden or 0, r.config, None if r.lam_independent else r.lam)].append(r)
    cells: list[Cell] = []
    for (*_, lam), runs in sorted(groups.items(), key=lambda kv: (*kv[0][:3], kv[0][3] or 0.0)):
        cells.extend(_cell(runs, column) for column in (sorted(set(lams)) if lam is None else [lam]))
    return cells
