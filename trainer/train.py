"""Train a batched lambda-ensemble with the modular loss; resumable, with early stopping.

    quorum train --arch mlp --modules 256 --hidden 4 --lam 0.99 --epochs 20 --out runs/demo

The run directory holds `config.json`, `metrics.jsonl` (one line per epoch), `last.pt`
(everything needed to resume) and `best.pt` (the weights of the epoch with the lowest
validation ensemble error: the paper's early stopping). At the end of an epoch, a new best is
staged as `best.next.pt`, the metrics line appended, and `last.pt` written: that write commits
the epoch; the staged best then replaces `best.pt`. Every write is atomic, and a resumed run
finishes or discards what a kill interrupted, so a run killed at any point resumes from its last
committed epoch with a `best.pt` that matches its record.
Each metrics record holds every module's validation error; after `dominance_epoch` the record
also holds the module-dominance check of trainer/diagnostics.py, which logs a warning when one
member carries the ensemble (over-capacity modules for joint training).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quorum.trainer.checkpoint import append_jsonl, atomic_torch_save, load_checkpoint, read_jsonl, write_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.data import Splits, augment, load_dataset
from quorum.trainer.errors import ConfigError, RunDirError, TrainerError
from quorum.trainer.evaluate import EvalResult, module_logits
from quorum.trainer.loss import mcl_loss, modular_loss
from quorum.trainer.models import Ensemble, create, takes_images
from quorum.trainer.models.mlp import BatchedMLP, DeepBatchedMLP
from quorum.trainer.prefix import prefix_objective
from quorum.trainer.records import epoch_record, log_epoch
from quorum.trainer.schedule import make_scheduler

__all__ = [
    "TrainResult",
    "autocast_dtype",
    "build_model",
    "check_finite",
    "commit_epoch",
    "epoch_bar",
    "epoch_generator",
    "initial_model",
    "load_data",
    "loss_for_epoch",
    "make_optimizer",
    "make_run_scheduler",
    "prepare_run_dir",
    "resolve_device",
    "run_metadata",
    "settle_staged_best",
    "train",
    "train_epoch",
]

log = logging.getLogger(__name__)

BEST, BEST_NEXT, LAST = "best.pt", "best.next.pt", "last.pt"


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int  # epochs finished, counting those of earlier (resumed) sessions
    best_epoch: int  # 1-based epoch whose weights are in best.pt (lowest validation error; MCL: oracle error)
    best_val_error: float
    stopped_early: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def build_model(
    cfg: TrainConfig, in_shape: tuple[int, ...], num_classes: int, num_modules: int | None = None
) -> Ensemble:
    """The run's architecture with `num_modules` modules (default: the run's M), freshly initialized."""
    M = cfg.modules if num_modules is None else num_modules
    return create(cfg.arch, num_modules=M, in_shape=in_shape, num_classes=num_classes, **cfg.arch_params())


def initial_model(cfg: TrainConfig, data: Splits, in_shape: tuple[int, ...]) -> Ensemble:
    """The run's ensemble before training, on the CPU: the same weights for every λ of a seed, and on every rank."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_shape, data.num_outputs)
    if (eta0 := cfg.task.initial_eta(data.train.y)) is not None:  # e.g. counts: exp(eta) far off diverges at once
        assert isinstance(model, BatchedMLP | DeepBatchedMLP), "non-class targets train MLPs only"
        bias = model.output_bias()  # (M, D)
        with torch.no_grad():
            bias.copy_(eta0.expand_as(bias))
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.SGD:
    """SGD over `model`'s parameters (the whole ensemble, or one rank's block of it)."""
    # The loss's gradients carry 1/M (eq. 8) and the default rate M: weight decay as for one module alone.
    return torch.optim.SGD(
        model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay / cfg.modules
    )


def make_run_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, num_train: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The run's `--schedule` over its epochs of ceil(num_train / batch) steps; None: a constant rate."""
    return make_scheduler(opt, cfg.schedule, cfg.epochs, math.ceil(num_train / cfg.batch_size), cfg.warmup_epochs)


def load_data(cfg: TrainConfig, data_dir: str | None = None) -> tuple[Splits, tuple[int, ...]]:
    """The run's dataset, its inputs shaped as the run's architecture takes them, and that shape."""
    data = load_dataset(cfg.dataset, data_dir or cfg.data_dir, val_size=cfg.val_size, subset=cfg.subset, seed=cfg.seed)
    in_shape = data.input_shape(takes_images(cfg.arch))
    for split in (data.train, data.val, data.test):
        split.x = split.x.reshape(len(split), *in_shape)
    return data, in_shape


def batch_augment(cfg: TrainConfig, data: Splits) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The run's `--augment` of a training batch, flat or image-shaped as the model takes it; None: off."""
    if not cfg.use_augment:
        return None
    if len(data.image_shape) != 3:
        raise ConfigError(f"--augment transforms images; {cfg.dataset} holds feature vectors")
    return functools.partial(augment, pad=cfg.augment_pad, flip=cfg.augment_flip, image_shape=data.image_shape)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the run's --precision on `device`; None: full fp32.

    auto: bf16 on CUDA where supported, else fp16; fp32 on the CPU. bf16 asked for explicitly
    runs on the CPU too; fp16 needs CUDA (its loss scaling)."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("--precision fp16 needs CUDA (it scales the loss); on the CPU use bf16 or fp32")
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def loss_for_epoch(cfg: TrainConfig, epoch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of 0-based `epoch` (`--loss`, the registry `loss.LOSSES`): the modular loss; MCL
    after its pretraining epochs of independent cross-entropy (the modular loss at lambda = 0); or a
    prefix-aware loss, whose random orders (dropout) come from (seed, epoch) alone, as the shuffle's do."""
    if cfg.loss == "mcl":
        if epoch < cfg.pretrain_epochs:
            return lambda logits, y: modular_loss(logits, y, 0.0)
        return lambda logits, y: mcl_loss(logits, y, cfg.mcl_k)
    task = cfg.task
    if cfg.loss in ("prefix", "dropout"):
        dropout = cfg.loss == "dropout"
        orders = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + (1 << 40)) if dropout else None
        return prefix_objective(task, cfg.lam, cfg.modules, cfg.prefix_weights, cfg.prefix_scale, orders)
    return lambda eta, y: task.modular_loss(eta, y, cfg.lam)


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    *,
    progress: bool = False,
    desc: str = "epoch",
    augment_batch: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    log_every: int = 50,
    sync_grads: Callable[[], None] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass over (x, y) in minibatches shuffled by `generator`; the mean training loss.

    The loss is accumulated on the device and read only every `log_every` steps, for the
    progress bar, and at the end: no per-batch host sync. `augment_batch` (`batch_augment`)
    transforms each batch; `autocast` runs the forward pass in that dtype (CUDA), with
    `scaler` for fp16. Module-parallel training (trainer/distributed.py) passes `sync_grads`,
    run between backward and step (a TreeNet trunk's gradient), and `reduce`, which sums this
    rank's share of the loss over the ranks (at the same steps on every rank). `scheduler` steps
    after every optimizer step.
    """
    model.train()
    n = len(y)
    perm = torch.randperm(n, generator=generator).to(x.device, non_blocking=True)
    loss_sum = torch.zeros((), device=x.device)
    steps = math.ceil(n / batch_size)
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, unit="batch")
    for i in range(steps):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        xb = augment_batch(x[idx], generator) if augment_batch is not None else x[idx]
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = loss_fn(model(xb).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if sync_grads is not None:
                sync_grads()
            opt.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * idx.numel()
        if (i + 1) % log_every == 0 or i + 1 == steps:
            total = loss_sum if reduce is None else reduce(loss_sum)  # a collective: every rank, same steps
            bar.update((i + 1) - bar.n)
            if progress:
                bar.set_postfix(loss=f"{float(total) / min(n, (i + 1) * batch_size):.4f}")
    bar.close()
    return float(total) / n


def prepare_run_dir(cfg: TrainConfig, out_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Check the run directory against the request; return the resume state, if any, having
    dropped the metrics of epochs that no checkpoint committed."""
    config_path, last_path = out_dir / "config.json", out_dir / LAST
    state = None
    if not resume:
        if config_path.exists():
            raise RunDirError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(config_path)
    else:
        if not config_path.exists():
            raise RunDirError(f"--resume: {out_dir} holds no run (no config.json); drop --resume to start one")
        cfg.save(config_path)  # records extended --epochs
        state = load_checkpoint(last_path) if last_path.exists() else None  # None: killed before its first epoch
        settle_staged_best(out_dir, state)
    # Lines past the checkpoint belong to an epoch whose checkpoint never landed.
    metrics_path = out_dir / "metrics.jsonl"
    write_jsonl([r for r in read_jsonl(metrics_path) if r["epoch"] <= (state["epoch"] if state else 0)], metrics_path)
    return state


def settle_staged_best(out_dir: Path, state: dict[str, Any] | None) -> None:
    """A best checkpoint staged by an epoch that was killed: keep it if last.pt committed that
    epoch (the kill came before the rename), else drop it (the epoch is trained again)."""
    staged = out_dir / BEST_NEXT
    if not staged.exists():
        return
    committed = state is not None and load_checkpoint(staged).get("epoch") == state["best_epoch"]
    if committed:
        staged.replace(out_dir / BEST)
    else:
        staged.unlink()


def run_metadata(cfg: TrainConfig, data: Splits, in_shape: tuple[int, ...]) -> dict[str, Any]:
    """What every checkpoint carries besides weights: enough to load and export the run."""
    return {
        "config": cfg.to_dict(),
        "norm": asdict(data.norm),
        "class_names": list(data.class_names),
        "in_shape": list(in_shape),
        "task": data.task,
        "target_names": list(data.target_names),
        "target_shift": list(data.target_shift),
        "target_scale": list(data.target_scale),
    }


def check_finite(train_loss: float, epoch: int, cfg: TrainConfig, best_epoch: int) -> None:
    """Stop a diverged run, saying what to change."""
    if not math.isfinite(train_loss):
        kept_note = f" best.pt still holds epoch {best_epoch}." if best_epoch else ""
        raise TrainerError(
            f"training diverged in epoch {epoch + 1} (loss {train_loss}); start a new run with a lower --lr "
            f"(this one used {cfg.learning_rate:g}).{kept_note}"
        )


def commit_epoch(
    out_dir: Path,
    meta: dict[str, Any],
    record: dict[str, Any],
    ev: EvalResult,
    model_state: dict[str, Any],
    opt_state: dict[str, Any],
    *,
    improved: bool,
    best_epoch: int,
    best_val: float,
    scheduler_state: dict[str, Any] | None = None,
) -> None:
    """Write an epoch's files in the commit order of the module docstring: staged best (if
    `improved`), metrics line, last.pt (the commit point), then the staged best promoted."""
    epoch = record["epoch"]
    if improved:
        atomic_torch_save(  # staged: it becomes best.pt once last.pt has committed the epoch
            {
                **meta,
                "model": model_state,
                "epoch": epoch,
                "val_error": ev.ensemble_error,
                "module_val_errors": ev.module_errors.tolist(),
            },
            out_dir / BEST_NEXT,
        )
    append_jsonl(record, out_dir / "metrics.jsonl")
    atomic_torch_save(  # the commit point of the epoch
        {
            **meta,
            "model": model_state,
            "optimizer": opt_state,
            **({"scheduler": scheduler_state} if scheduler_state is not None else {}),
            "epoch": epoch,
            "best_epoch": best_epoch,
            "best_val_error": best_val,
        },
        out_dir / LAST,
    )
    if improved:
        (out_dir / BEST_NEXT).replace(out_dir / BEST)


def epoch_generator(cfg: TrainConfig, epoch: int) -> torch.Generator:
    """The shuffle of 0-based `epoch`, from (seed, epoch) alone: a resumed run, and every rank of a
    module-parallel one, sees the same batches."""
    return torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)


def epoch_bar(cfg: TrainConfig, start_epoch: int, progress: bool, note: str = "") -> tqdm[int]:
    """The epochs left to train, as a progress bar (off unless `progress`)."""
    return tqdm(
        range(start_epoch, cfg.epochs),
        desc=f"{cfg.name} lam={cfg.lam}{note}",
        unit="epoch",
        disable=not progress,
        initial=start_epoch,
        total=cfg.epochs,
    )


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) the run in `out_dir` in this process. See the module docstring; under
    torchrun, `quorum.trainer.distributed.train_distributed` trains the same run over several."""
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    autocast = autocast_dtype(cfg, device)  # refuses fp16 on the CPU before anything is written
    state = prepare_run_dir(cfg, out_dir, resume)
    data, in_shape = load_data(cfg)

    model = initial_model(cfg, data, in_shape).to(device)
    if len(in_shape) == 3:
        # Grouped convolutions run several times faster channels-last, on cuDNN and on the CPU
        # alike (docs/RESULTS.md, "Channels-last").
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    scheduler = make_run_scheduler(cfg, opt, len(data.train))  # before the optimizer's saved state: see its docs
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None

    start_epoch, best_epoch, best_val = 0, 0, math.inf
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_epoch, best_val = state["epoch"], state["best_epoch"], state["best_val_error"]
        log.info(
            "resuming %s from epoch %d (best so far: epoch %d, val error %.4f)",
            out_dir,
            start_epoch,
            best_epoch,
            best_val,
        )

    x_train, y_train = data.train.x.to(device, non_blocking=True), data.train.y.to(device, non_blocking=True)
    x_val, y_val = data.val.x.to(device, non_blocking=True), data.val.y.to(device, non_blocking=True)
    meta = run_metadata(cfg, data, in_shape)

    stopped_early = False
    epochs = epoch_bar(cfg, start_epoch, progress)
    for epoch in epochs:
        t0 = time.perf_counter()
        gen = epoch_generator(cfg, epoch)
        train_loss = train_epoch(
            model,
            opt,
            x_train,
            y_train,
            loss_for_epoch(cfg, epoch),
            cfg.batch_size,
            gen,
            progress=progress,
            desc=f"epoch {epoch + 1}",
            augment_batch=batch_augment(cfg, data),
            autocast=autocast,
            scaler=scaler,
            log_every=cfg.log_every,
            scheduler=scheduler,
        )
        check_finite(train_loss, epoch, cfg, best_epoch)

        val_logits = module_logits(model, x_val)  # (N, M, K)
        record, ev, score = epoch_record(
            cfg, epoch, train_loss, val_logits, y_val, data.target_scale, t0, lr=opt.param_groups[0]["lr"]
        )
        improved = score < best_val
        if improved:
            best_val, best_epoch = score, epoch + 1
        commit_epoch(
            out_dir, meta, record, ev, model.state_dict(), opt.state_dict(),
            improved=improved, best_epoch=best_epoch, best_val=best_val,
            scheduler_state=None if scheduler is None else scheduler.state_dict(),
        )  # fmt: skip
        epochs.set_postfix(
            loss=f"{train_loss:.4f}", val_err=f"{ev.ensemble_error:.4f}", best=f"{best_val:.4f}@{best_epoch}"
        )
        if not progress:
            log_epoch(cfg, record)
        if cfg.patience is not None and epoch + 1 - best_epoch >= cfg.patience:
            stopped_early = True
            log.info("no better validation error for %d epochs: stopping early", cfg.patience)
            break

    done = read_jsonl(out_dir / "metrics.jsonl")
    return TrainResult(out_dir, len(done), best_epoch, best_val, stopped_early)
