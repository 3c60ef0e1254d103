"""One rank's place in a module-parallel run, the collectives it takes part in, and its share of the loss.

Rank r of W trains modules [start, stop) of M (`blocks.block_bounds`). Per step it sends one
message: the (B, K) sum of its modules' outputs, all-reduced into the sum over all M, from
which every rank has the ensemble's η̄ (Webb et al. §3.3). The loss and its gradient with
respect to each local η_j are then computed locally (eq. 8), equal to the single-process ones.
Every method of `Peers` is a collective: each rank calls it at the same point of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from quorum.trainer.blocks import block_bounds
from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import PeerLost

__all__ = ["Peers", "broadcast", "share_loss"]

T = TypeVar("T")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _collective(rank: int, what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:  # gloo and NCCL report a dead peer as a RuntimeError
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise PeerLost(
            f"rank {rank}: another rank stopped answering during {what} ({detail}). torchrun's report names "
            "the rank that failed; the run continues from its last committed epoch by itself under "
            "torchrun --max-restarts N, or when started again with --resume"
        ) from e


def broadcast(obj: T, rank: int) -> T:
    """Rank 0's `obj` on every rank (pickled); `rank` is this process's."""
    box = [obj]
    _collective(rank, "a broadcast", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


class Peers:
    """Rank `rank` of `world_size` in a module-parallel run of `num_modules` modules, on the
    default process group (gloo on CPUs, NCCL on GPUs)."""

    def __init__(self, rank: int, world_size: int, num_modules: int):
        self.rank, self.world_size, self.num_modules = rank, world_size, num_modules
        self.bounds = block_bounds(num_modules, world_size)  # [(start, stop)] of every rank
        self.start, self.stop = self.bounds[rank]

    @property
    def is_writer(self) -> bool:
        """Rank 0 evaluates, logs and writes the run directory."""
        return self.rank == 0

    @property
    def block_size(self) -> int:
        return self.stop - self.start

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks (a new tensor, not part of any graph)."""
        out = t.detach().clone()
        _collective(self.rank, "an all-reduce", lambda: dist.all_reduce(out))
        return out

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of parameters every rank holds a copy of (a TreeNet's trunk), in one message."""
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads), "every shared parameter has a gradient on every rank"
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads if g is not None]))
        offset = 0
        for g in grads:
            assert g is not None
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled)."""
        return broadcast(obj, self.rank)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (pickled); None on the others."""
        out: list[Any] | None = [None] * self.world_size if self.is_writer else None
        _collective(self.rank, "a gather", lambda: dist.gather_object(obj, out, dst=0))
        return out


def share_loss(cfg: TrainConfig, epoch: int, peers: Peers) -> LossFn:
    """This rank's share of the training loss of 0-based `epoch` (`train.loss_for_epoch`), from its
    block's outputs (B, M_b, K): its gradient with respect to each local η_j is the single-process
    one, and the shares of all ranks sum to the single-process loss."""
    if cfg.loss == "mcl" and epoch >= cfg.pretrain_epochs and cfg.mcl_k < cfg.modules:
        return lambda eta, y: _mcl_share(eta, y, cfg.mcl_k, peers)
    lam = 0.0 if cfg.loss == "mcl" else cfg.lam  # MCL's pretraining (and k = M): independent training
    task = cfg.task
    M = cfg.modules

    def modular(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        share = eta.new_zeros(())
        if lam > 0:  # λ = 0 trains each module alone: nothing to send
            local = eta.sum(dim=1)  # (B, K): this rank's modules
            total = peers.sum(local)  # (B, K): all M modules; the step's one message, B×K floats
            # Value: exactly the ensemble's mean; gradient: 1/M to each local η_j, as mean_j η_j gives.
            eta_bar = (total + (local - local.detach())) / M
            joint = task.modular_loss(eta_bar.unsqueeze(1), y, 1.0)
            # Every rank back-propagates the joint term; its value counts once, on rank 0.
            share = lam * (joint if peers.is_writer else joint - joint.detach())
        if lam < 1:  # mean_j over all M modules: this block's M_b of them, weighted M_b / M
            share = share + (1.0 - lam) * (peers.block_size / M) * task.modular_loss(eta, y, 0.0)
        return share

    return modular


def _mcl_share(eta: torch.Tensor, y: torch.Tensor, k: int, peers: Peers) -> torch.Tensor:
    """MCL (`loss.mcl_loss`) over the ranks: each example's k lowest-CE modules among all M are chosen
    from every module's CE (B×M floats a step), and train as they would in one process."""
    B, Mb, _ = eta.shape
    ce = F.cross_entropy(eta.permute(1, 2, 0), y.expand(Mb, B), reduction="none")  # (M_b, B)
    every = ce.new_zeros(peers.num_modules, B)
    every[peers.start : peers.stop] = ce.detach()
    every = peers.sum(every)  # (M, B): each entry from its own rank, zeros elsewhere: exact
    chosen = every.topk(k, dim=0, largest=False).indices  # (k, B), the same on every rank
    mask = torch.zeros_like(every).scatter_(0, chosen, 1.0)[peers.start : peers.stop]  # (M_b, B)
    return (ce * mask).sum() / (B * k)
