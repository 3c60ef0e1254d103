"""Module-parallel training under torchrun (Webb et al. §3.3): the same run as `train.train`, over W processes.

    torchrun --nproc-per-node 2 -m quorum train --arch mlp --modules 256 --hidden 4 --out runs/a

Every rank builds the whole ensemble from the seed (so each module starts with the single-process
weights, or those of the resumed checkpoint) and keeps one contiguous block of modules as its
own batched model (trainer/blocks.py). Every rank sees the same minibatches. Per step one
all-reduce of the (B, K) sum of the block's outputs gives every rank η̄, and each rank
back-propagates its own modules from eq. (8) (trainer/peers.py): the gradients are the
single-process ones. A TreeNet's trunk is replicated on every rank and its gradient summed over
the ranks after backward (one more message, the trunk's size), so the copies stay identical.

Rank 0 evaluates and writes: once per epoch it gathers every block's validation outputs and
weights, computes the single-process metrics, and writes the checkpoints of the whole ensemble
in the single-process format and commit order (train.py), so `quorum export` and `--resume`
(at this world size, another one, or in one process) read them as any run's. A rank that dies
ends the job; torchrun names it, and under `--max-restarts N` the restarted job resumes from the
last committed epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from quorum.trainer.blocks import block_of, join_optimizer_states, join_states, module_rows, slice_optimizer_state
from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import ConfigError, PeerLost
from quorum.trainer.evaluate import module_logits
from quorum.trainer.peers import Peers, broadcast, share_loss
from quorum.trainer.records import epoch_record, log_epoch
from quorum.trainer.train import (
    TrainResult,
    autocast_dtype,
    batch_augment,
    build_model,
    check_finite,
    commit_epoch,
    epoch_bar,
    epoch_generator,
    initial_model,
    load_data,
    make_optimizer,
    prepare_run_dir,
    resolve_device,
    run_metadata,
    train_epoch,
)

__all__ = ["Launch", "process_group", "rank_device", "train_distributed"]

log = logging.getLogger(__name__)

# After a peer is lost, how long a surviving rank waits for torchrun to stop it: a survivor that
# exited at once could be reported by torchrun as the first failure, instead of the rank that died.
LAUNCHER_GRACE_S = 30.0


@dataclass(frozen=True)
class Launch:
    """How torchrun started this process (its environment variables)."""

    rank: int  # RANK: 0..world_size-1; rank 0 evaluates, logs and writes the run directory
    world_size: int  # WORLD_SIZE: processes in the job, over every host
    local_rank: int = 0  # LOCAL_RANK: rank on this host, the GPU it trains on
    restarts: int = 0  # TORCHELASTIC_RESTART_COUNT: > 0 after torchrun restarted the job (--max-restarts)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Launch | None:
        """The launch that torchrun describes in `env` (e.g. os.environ); None outside torchrun."""
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            restarts=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of a rank for --device `name`: its own GPU (cuda:LOCAL_RANK), or the CPU."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own (this host has {count}): start at most {count} "
            f"processes per host (torchrun --nproc-per-node {count}), or train on the CPU with --device cpu"
        )
    return torch.device("cuda", local_rank)


def _autocast(cfg: TrainConfig, device: torch.device, *, warn: bool) -> torch.dtype | None:
    """The run's autocast dtype, without fp16: its loss scaler skips a step that overflows on one
    rank only, and the ranks' modules would then drift apart from the single-process run."""
    if cfg.precision == "fp16":
        raise ConfigError("--precision fp16 cannot train module-parallel (per-rank loss scaling); use bf16 or fp32")
    dtype = autocast_dtype(cfg, device)
    if dtype != torch.float16:
        return dtype
    if warn:
        log.warning("this GPU has no bf16: training module-parallel in fp32 (fp16 scales the loss per rank)")
    return None


@contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[None]:
    """The default process group of the launch (torchrun's rendezvous): NCCL between GPUs, gloo between CPUs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun's store outlives a restart, and a restarted attempt would read the addresses of the
    # attempt before it (pytorch/pytorch#135712, #167288): every attempt keys its own.
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"quorum/attempt_{launch.restarts}", store)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cpu(obj: Any) -> Any:
    """A copy of a state (nested dicts and lists of tensors) on the CPU, to send."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def train_distributed(
    cfg: TrainConfig, out_dir: str | Path, *, launch: Launch, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Train (or resume) the run in `out_dir` as rank `launch.rank` of `launch.world_size`; see the
    module docstring. Rank 0's `cfg` and `resume` decide; the other ranks follow it."""
    out_dir = Path(out_dir)
    _check_single_process_options(cfg)
    device = rank_device(cfg.device, launch.local_rank)
    _autocast(cfg, device, warn=False)  # refuses fp16 before anything is written
    with process_group(launch, device):
        try:
            return _train(cfg, out_dir, launch, device, resume=resume, progress=progress)
        except PeerLost as e:
            log.error("%s", e)
            time.sleep(LAUNCHER_GRACE_S)
            raise


def _check_single_process_options(cfg: TrainConfig) -> None:
    """Refuse what module-parallel training does not do yet, saying how to train it instead."""
    if cfg.loss in ("prefix", "dropout"):
        raise ConfigError(
            f"--loss {cfg.loss} trains in one process only: its prefixes cross the ranks' blocks of modules. "
            "Start it without torchrun (quorum train ...)"
        )
    if cfg.schedule != "constant":
        raise ConfigError(
            f"--schedule {cfg.schedule} trains in one process only; use --schedule constant under torchrun, "
            "or start it without torchrun"
        )


def _train(
    cfg: TrainConfig,
    out_dir: Path,
    launch: Launch,
    device: torch.device,
    *,
    resume: bool,
    progress: bool,
) -> TrainResult:
    writer = launch.rank == 0
    progress = progress and writer
    # Rank 0 alone reads and writes the run directory; every rank trains its config from its state.
    # (An error there is raised on every rank.) The state travels with it: no shared filesystem needed.
    prepared: tuple[TrainConfig, dict[str, Any] | None] | Exception | None = None
    if writer:
        try:
            prepared = (cfg, prepare_run_dir(cfg, out_dir, resume))
        except Exception as e:
            prepared = e
    prepared = broadcast(prepared, launch.rank)
    if isinstance(prepared, Exception):
        raise prepared
    assert prepared is not None
    cfg, state = prepared
    peers = Peers(launch.rank, launch.world_size, cfg.modules)
    autocast = _autocast(cfg, device, warn=writer)

    data, in_shape = load_data(cfg)
    full = initial_model(cfg, data, in_shape)  # the single-process init, on the CPU
    if state is not None:
        full.load_state_dict(state["model"])
    build = partial(build_model, cfg, in_shape, data.num_outputs)  # build(m): the architecture with m modules
    rows = module_rows(build)
    model = block_of(full, build, rows, peers.start, peers.stop).to(device)  # modules [start, stop)
    del full
    if len(in_shape) == 3:
        model = model.to(memory_format=torch.channels_last)  # as train.train, for grouped convolutions
    opt = make_optimizer(cfg, model)
    names = [name for name, _ in model.named_parameters()]  # the optimizer's order
    shared = [p for name, p in model.named_parameters() if rows[name] is None]  # a TreeNet's trunk

    start_epoch, best_epoch, best_val = 0, 0, math.inf
    if state is not None:
        opt.load_state_dict(slice_optimizer_state(state["optimizer"], names, rows, peers.start, peers.stop))
        start_epoch, best_epoch, best_val = state["epoch"], state["best_epoch"], state["best_val_error"]
        if writer:
            log.info("resuming %s from epoch %d on %d processes", out_dir, start_epoch, launch.world_size)
    state = None
    if writer:
        log.info(
            "module-parallel: %d processes, modules per rank %s", launch.world_size, [b - a for a, b in peers.bounds]
        )

    x_train, y_train = data.train.x.to(device, non_blocking=True), data.train.y.to(device, non_blocking=True)
    x_val = data.val.x.to(device, non_blocking=True)
    meta = run_metadata(cfg, data, in_shape)

    stopped_early, epochs_done = False, start_epoch
    epochs = epoch_bar(cfg, start_epoch, progress, f" x{launch.world_size}")
    for epoch in epochs:
        t0 = time.perf_counter()
        gen = epoch_generator(cfg, epoch)  # the same batches on every rank
        train_loss = train_epoch(
            model,
            opt,
            x_train,
            y_train,
            share_loss(cfg, epoch, peers),
            cfg.batch_size,
            gen,
            progress=progress,
            desc=f"epoch {epoch + 1}",
            augment_batch=batch_augment(cfg, data),
            autocast=autocast,
            log_every=cfg.log_every,
            sync_grads=(lambda: peers.sum_grads(shared)) if shared else None,
            reduce=peers.sum,
        )
        check_finite(train_loss, epoch, cfg, best_epoch)  # the summed loss: every rank stops alike

        # The epoch's one gather: rank 0 receives every block's validation outputs and state.
        val_block = module_logits(model, x_val)  # (N, M_b, K)
        parts = peers.gather(_cpu((val_block, model.state_dict(), opt.state_dict())))
        if parts is not None:
            val_logits = torch.cat([p[0] for p in parts], dim=1)  # (N, M, K), modules in order
            record, ev, score = epoch_record(cfg, epoch, train_loss, val_logits, data.val.y, data.target_scale, t0)
            improved = score < best_val
            if improved:
                best_val, best_epoch = score, epoch + 1
            commit_epoch(
                out_dir, meta, record, ev, join_states([p[1] for p in parts], rows),
                join_optimizer_states([p[2] for p in parts], names, rows),
                improved=improved, best_epoch=best_epoch, best_val=best_val,
            )  # fmt: skip
            epochs.set_postfix(
                loss=f"{train_loss:.4f}", val_err=f"{ev.ensemble_error:.4f}", best=f"{best_val:.4f}@{best_epoch}"
            )
            if not progress:
                log_epoch(cfg, record)
        # Every rank waits here for rank 0's commit, and learns the best epoch from it.
        best_epoch, best_val = peers.broadcast((best_epoch, best_val))
        epochs_done = epoch + 1
        if cfg.patience is not None and epoch + 1 - best_epoch >= cfg.patience:
            stopped_early = True
            if writer:
                log.info("no better validation error for %d epochs: stopping early", cfg.patience)
            break
    return TrainResult(out_dir, epochs_done, best_epoch, best_val, stopped_early)
