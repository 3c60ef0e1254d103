"""Module-parallel training against DistributedDataParallel on the same ensemble: what each sends
per step and how long a step takes, at 1 and 2 processes on this machine, side by side in one
run; then a model of both for W = 2..64 nodes from the measured compute and a stated link.

    python bench/distributed.py                          # 256-M-4-H and a 16-module ConvNet
    python bench/distributed.py --steps 5 --warmup 1 --only mlp    # a smoke run

  module-parallel  as `torchrun -m quorum train` trains (trainer/peers.py): rank r holds a block
                   of M/W modules and sees the whole batch; per step one all-reduce of the (B, K)
                   sum of its modules' outputs (B x K floats), whatever the model's size
  ddp              torch's DistributedDataParallel over the whole ensemble: every rank holds all
                   M modules and B/W examples of the batch; per step it all-reduces every
                   gradient (P floats, in buckets)

Both train with the modular loss (λ = 0.99), SGD with momentum, batch B = 100 of Fashion-MNIST,
over gloo on this host's loopback; every rank gets cores/W threads. "floats" is what each rank
hands to all-reduce per step, counted at the collectives; a ring all-reduce sends 2(W-1)/W
times that per rank over the wire (`wire`). Steps are timed after --warmup untimed ones, over
--steps, the median of --rounds rounds, the methods interleaved.

The model: a step on W nodes (each one like this machine) is the compute of one node's share,
measured here in one process (module-parallel: a block of ceil(M/W) modules on the whole batch;
DDP: all M modules on ceil(B/W) examples), plus an all-reduce of the method's payload over a
link of --gbit Gbit/s with --latency-us a message: 2·log2(W)·latency + 2(W-1)/W·bytes/bandwidth
per all-reduce (Rabenseifner's reduce-scatter and all-gather; DDP pays the latency once a
bucket). Communication does not overlap compute (DDP's buckets can hide some behind backward).
Module-parallel cannot use more nodes than modules: beyond M it needs data-parallel groups.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from quorum.trainer.blocks import block_of, module_rows
from quorum.trainer.config import TrainConfig
from quorum.trainer.data import Splits
from quorum.trainer.peers import Peers, share_loss
from quorum.trainer.train import build_model, load_data, loss_for_epoch, make_optimizer

WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {"modules": 256, "hidden": 4},  # the papers' 256-M-4-H
    "convnet": {"arch": "convnet", "modules": 16, "filters": "16,32,32", "strides": "2,2,1"},
}
METHODS = ("module-parallel", "ddp")
CORES = os.cpu_count() or 1


def _config(workload: str) -> TrainConfig:
    return TrainConfig(**WORKLOADS[workload], lam=0.99, subset=2000, val_size=1000)


class _Counter:
    """Floats handed to all-reduce, per step."""

    def __init__(self) -> None:
        self.floats = 0
        self.calls = 0

    def add(self, t: torch.Tensor) -> None:
        self.floats += t.numel()
        self.calls += 1


def _worker(rank: int, world: int, workload: str, method: str, steps: int, warmup: int, tmp: str) -> None:
    """One rank: train `warmup` + `steps` steps; rank 0 writes what it measured."""
    torch.set_num_threads(max(1, CORES // world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{method}-{world}", rank=rank, world_size=world)
    cfg = _config(workload)
    data, in_shape = load_data(cfg)
    x, y = data.train.x, data.train.y
    build = partial(build_model, cfg, in_shape, data.num_outputs)  # build(m): the architecture with m modules
    torch.manual_seed(cfg.seed)
    full = build(cfg.modules)
    if len(in_shape) == 3:
        full = full.to(memory_format=torch.channels_last)  # as the trainer runs grouped convolutions
    params = sum(p.numel() for p in full.parameters())
    counter = _Counter()
    B = cfg.batch_size
    if method == "module-parallel":
        peers = Peers(rank, world, cfg.modules)
        model = block_of(full, build, module_rows(build), peers.start, peers.stop)
        if len(in_shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = share_loss(cfg, 0, peers)
        all_reduce = dist.all_reduce

        def counted(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.add(t)
            return all_reduce(t, *args, **kwargs)

        dist.all_reduce = counted  # type: ignore[assignment]  # Peers sends through it
        local = slice(0, B)  # every rank sees the whole batch
    else:
        model = DistributedDataParallel(full)

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations; these would be strings
            counter.add(bucket.buffer())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
        loss_fn = loss_for_epoch(cfg, 0)
        share = B // world
        local = slice(rank * share, (rank + 1) * share)  # this rank's examples of the batch
    opt = make_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        idx = torch.randint(0, len(y), (B,), generator=gen)[local]
        dist.barrier()
        t0 = time.perf_counter()
        loss = loss_fn(model(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if step + 1 == warmup:
            counter.floats = counter.calls = 0
    if rank == 0:
        result = {
            "seconds_per_step": statistics.median(times[warmup:]),
            "floats_per_step": counter.floats / steps,
            "all_reduces_per_step": counter.calls / steps,
            "parameters": params,
            "batch": B,
            "classes": data.num_outputs,
        }
        Path(f"{tmp}/{method}-{world}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(workload: str, worlds: list[int], steps: int, warmup: int, rounds: int) -> dict[tuple[str, int], Any]:
    """Per (method, processes): the median over rounds of rank 0's measurements."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for world in worlds:
            for method in METHODS:  # interleaved: the machine's drift hits both alike
                with tempfile.TemporaryDirectory() as tmp:
                    mp.spawn(_worker, (world, workload, method, steps, warmup, tmp), nprocs=world)
                    runs.setdefault((method, world), []).append(
                        json.loads(Path(f"{tmp}/{method}-{world}.json").read_text())
                    )
    out = {}
    for key, results in runs.items():
        out[key] = {**results[0], "seconds_per_step": statistics.median(r["seconds_per_step"] for r in results)}
    return out


def _allreduce_seconds(floats: float, calls: float, nodes: int, gbit: float, latency_us: float) -> float:
    """The model's all-reduce of `floats` float32 values in `calls` messages over `nodes` nodes."""
    if nodes == 1:
        return 0.0
    bandwidth = 2 * (nodes - 1) / nodes * 4 * floats / (gbit * 1e9 / 8)
    return calls * 2 * math.ceil(math.log2(nodes)) * latency_us * 1e-6 + bandwidth


def compute_seconds(
    cfg: TrainConfig, data: Splits, in_shape: tuple[int, ...], modules: int, batch: int, steps: int, warmup: int
) -> float:
    """Median seconds of a training step of `modules` modules on `batch` examples, in this process,
    with no communication: one node's share of the work."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_shape, data.num_outputs, modules)
    if len(in_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    loss_fn = loss_for_epoch(cfg, 0)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(warmup + steps):
        idx = torch.randint(0, len(data.train.y), (batch,), generator=gen)
        t0 = time.perf_counter()
        loss = loss_fn(model(data.train.x[idx]).float(), data.train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def report_measured(cfg: TrainConfig, got: dict[tuple[str, int], Any], worlds: list[int]) -> list[dict[str, Any]]:
    """Print and return what the processes measured, side by side."""
    first = got[("ddp", worlds[0])]
    print(f"\n{cfg.name}: {first['parameters']:,} parameters, batch {first['batch']}, {first['classes']} classes")
    print(f"  {'method':<16} {'W':>2} {'floats/step':>12} {'all-reduces':>11} {'wire KiB/rank':>13} {'ms/step':>8}")
    rows = []
    for world in worlds:
        for method in METHODS:
            r = got[(method, world)]
            wire = 2 * (world - 1) / world * 4 * r["floats_per_step"] / 1024
            print(f"  {method:<16} {world:>2} {r['floats_per_step']:>12,.0f} {r['all_reduces_per_step']:>11.0f} "
                  f"{wire:>13,.1f} {1e3 * r['seconds_per_step']:>8.2f}")  # fmt: skip
            rows.append({"method": method, "processes": world, **r, "wire_kib_per_rank": wire})
    ratio = got[("ddp", worlds[-1])]["floats_per_step"] / got[("module-parallel", worlds[-1])]["floats_per_step"]
    print(f"  DDP sends {ratio:,.0f}x the floats of module-parallel per step")
    return rows


def report_model(cfg: TrainConfig, measured: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print and return the model's step time for W = 2..64 nodes: one node's share of the compute,
    measured here in one process, plus the all-reduce of the method's payload."""
    data, in_shape = load_data(cfg)

    def compute(modules: int, batch: int) -> float:
        return compute_seconds(cfg, data, in_shape, modules, batch, args.steps, args.warmup)

    M, B = cfg.modules, measured["batch"]
    payload = {  # floats and messages per step
        "module-parallel": (B * measured["classes"], 1.0),
        "ddp": (measured["parameters"], measured["ddp_all_reduces"]),  # one message a bucket
    }
    one = compute(M, B)
    print(
        f"  model: nodes like this machine ({CORES} threads), {args.gbit:g} Gbit/s, {args.latency_us:g} µs a message;"
    )
    print(f"  one node {1e3 * one:.2f} ms/step; KiB each node sends, ms/step, speed-up over one node")
    print(f"  {'W':>4} {'MP KiB':>9} {'MP ms':>8} {'MP x':>6} {'DDP KiB':>9} {'DDP ms':>8} {'DDP x':>6}")
    projection = []
    for nodes in (2, 4, 8, 16, 32, 64):
        shares = {"module-parallel": (math.ceil(M / nodes), B), "ddp": (M, math.ceil(B / nodes))}
        row: dict[str, Any] = {"nodes": nodes}
        cells = []
        for method in METHODS:
            floats, calls = payload[method]
            wire = 2 * (nodes - 1) / nodes * 4 * floats / 1024
            if method == "module-parallel" and nodes > M:
                row[method] = None  # more nodes than modules: data-parallel groups would be needed
                cells.append(f"{wire:>9,.1f} {'-':>8} {'-':>6}")
                continue
            step = compute(*shares[method]) + _allreduce_seconds(floats, calls, nodes, args.gbit, args.latency_us)
            row[method] = {"wire_kib": wire, "ms": 1e3 * step, "speedup": one / step}
            cells.append(f"{wire:>9,.1f} {1e3 * step:>8.2f} {one / step:>6.1f}")
        projection.append(row)
        print(f"  {nodes:>4} {' '.join(cells)}")
    return projection


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(WORKLOADS), help="one workload")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="world sizes to measure (default: 1 2)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="runs per (method, processes); the median is reported")
    p.add_argument("--gbit", type=float, default=10.0, help="the model's link bandwidth, Gbit/s (default: 10 GbE)")
    p.add_argument("--latency-us", type=float, default=50.0, help="the model's latency per message, µs")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    report: dict[str, Any] = {"cores": CORES, "gbit": args.gbit, "latency_us": args.latency_us, "workloads": {}}
    print(f"gloo on loopback, {CORES} cores (cores/W threads a rank); median of {args.rounds} x {args.steps} steps")
    for workload in [args.only] if args.only else list(WORKLOADS):
        cfg = _config(workload)
        got = measure(workload, args.processes, args.steps, args.warmup, args.rounds)
        rows = report_measured(cfg, got, args.processes)
        ddp = got[("ddp", args.processes[-1])]
        projection = report_model(cfg, {**ddp, "ddp_all_reduces": ddp["all_reduces_per_step"]}, args)
        report["workloads"][cfg.name] = {"measured": rows, "projection": projection}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
