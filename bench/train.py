"""Training throughput: our batched 256-M-4-H trainer against the physical floor and torchensemble.

    pip install -e '.[bench]'        # torchensemble, for this benchmark only
    python bench/train.py

Seconds per epoch of Fashion-MNIST (the 50,000 training images left after the 10,000-image
validation hold-out), batch 100, SGD, on this process's CPU threads:

  ours       BatchedMLP(256 modules of 784-4-10) with the modular loss (λ = 0.99), through
             the trainer's own `train_epoch`: one 784 -> 1024 matmul, one batched (256, 4, 10)
  floor      nn.Sequential(784 -> 1024 -> ReLU -> 10) with cross-entropy: the same multiply-adds
             in layer 1 and fewer in layer 2, no per-module loss; through the same `train_epoch`
  voting     torchensemble VotingClassifier, 256 members of 784-4-10, each trained on its own
  fusion     torchensemble FusionClassifier, 256 members of 784-4-10, trained on their average

ours and floor run whole epochs, alternately, and report the median. torchensemble is ~100x
slower, so it runs on --fraction of the epoch and is scaled up (linear in the batches run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quorum.trainer.data import load_fashion_mnist
from quorum.trainer.loss import modular_loss
from quorum.trainer.models import create
from quorum.trainer.train import train_epoch

M, H, K, D = 256, 4, 10, 784


class Member(nn.Module):
    """One 784-4-10 module, as torchensemble builds its members."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def epoch_seconds(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, lr: float, seed: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    t0 = time.perf_counter()
    train_epoch(model, opt, x, y, loss_fn, 100, torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0


def torchensemble_seconds(kind: str, x: torch.Tensor, y: torch.Tensor, fraction: float) -> float:
    """Seconds for one full epoch, extrapolated from `fraction` of it."""
    from torchensemble import FusionClassifier, VotingClassifier

    n = max(100, int(len(y) * fraction) // 100 * 100)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=100, shuffle=True)
    cls = {"voting": VotingClassifier, "fusion": FusionClassifier}[kind]
    model = cls(estimator=Member, n_estimators=M, cuda=False)
    model.set_optimizer("SGD", lr=0.02, momentum=0.9)
    logging.disable(logging.INFO)  # and logs on the root logger
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # it may write logs or checkpoints into the working directory
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # VotingClassifier prints every member's first batch
                model.fit(loader, epochs=1, log_interval=10**9, save_model=False)
            seconds = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
            logging.disable(logging.NOTSET)
    return seconds * len(y) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs of ours and of the floor (median)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of an epoch torchensemble runs")
    p.add_argument("--skip-torchensemble", action="store_true")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument("--subset", type=int, help="train on only N images (a smoke run; not a benchmark)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    data = load_fashion_mnist(args.data_dir, subset=args.subset)
    x, y = data.train.x.reshape(len(data.train.y), -1), data.train.y
    print(f"{len(y)} training images, batch 100, torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    torch.manual_seed(0)
    ours = create("mlp", num_modules=M, hidden=H, in_shape=(D,), num_classes=K)
    floor = nn.Sequential(nn.Linear(D, M * H), nn.ReLU(), nn.Linear(M * H, K))
    runs: dict[str, list[float]] = {"ours": [], "floor": []}
    for epoch in range(args.epochs + 1):  # the first epoch of each warms up and is not counted
        s_ours = epoch_seconds(ours, lambda lo, t: modular_loss(lo, t, 0.99), x, y, 0.02 * M, epoch)
        s_floor = epoch_seconds(floor, F.cross_entropy, x, y, 0.1, epoch)
        if epoch:
            runs["ours"].append(s_ours)
            runs["floor"].append(s_floor)
        print(f"  epoch {epoch}: ours {s_ours:6.2f} s, floor {s_floor:6.2f} s" + ("" if epoch else " (warm-up)"))
    result = {name: statistics.median(v) for name, v in runs.items()}
    if not args.skip_torchensemble:
        try:
            for kind in ("fusion", "voting"):
                result[kind] = torchensemble_seconds(kind, x, y, args.fraction)
                print(f"  torchensemble {kind}: {result[kind]:7.1f} s per epoch (from {args.fraction:g} of one)")
        except ModuleNotFoundError:
            print("  torchensemble is not installed: pip install -e '.[bench]' (skipped)")

    print(f"\n{'trainer':<22} {'s/epoch':>8} {'vs ours':>8}")
    for name, seconds in result.items():
        print(f"{name:<22} {seconds:8.2f} {seconds / result['ours']:8.2f}x")
    print(f"\nours / floor = {result['ours'] / result['floor']:.2f} (goal <= 1.3)")
    for kind in ("fusion", "voting"):
        if kind in result:
            print(f"{kind} / ours = {result[kind] / result['ours']:.0f} (goal >= 30)")
    if args.json:
        Path(args.json).write_text(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
