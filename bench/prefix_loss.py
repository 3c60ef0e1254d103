"""What the prefix-aware losses cost over the modular loss: training seconds of 256-M-4-H, side by side.

    python bench/prefix_loss.py                      # 10,000 Fashion-MNIST images per round, 5 rounds
    python bench/prefix_loss.py --images 500 --rounds 1 --modules 16   # a smoke run, not a benchmark

Each round trains one pass over the same images with each loss in turn (modular at λ = 0.99; prefix;
dropout), through the trainer's own `train_epoch`, from the same weights; the rounds interleave the
losses so that a busy machine slows them alike. Prints the median seconds per pass and each prefix
loss's ratio to the modular loss (1.00 = free).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from quorum.trainer.config import TrainConfig
from quorum.trainer.train import initial_model, load_data, loss_for_epoch, make_optimizer, train_epoch

LOSSES = ("modular", "prefix", "dropout")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=int, default=256, help="M (default: 256)")
    p.add_argument("--hidden", type=int, default=4, help="H (default: 4)")
    p.add_argument("--images", type=int, default=10_000, help="training images per pass (default: 10000)")
    p.add_argument("--rounds", type=int, default=5, help="passes per loss; the median is reported (default: 5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = TrainConfig(modules=args.modules, hidden=args.hidden)
    data, in_shape = load_data(base)
    x, y = data.train.x[: args.images], data.train.y[: args.images]
    cfgs = {loss: TrainConfig(modules=args.modules, hidden=args.hidden, loss=loss) for loss in LOSSES}
    times: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    for r in range(args.rounds + 1):  # round 0 warms up
        for loss, cfg in cfgs.items():
            model = initial_model(cfg, data, in_shape)
            opt = make_optimizer(cfg, model)
            t0 = time.perf_counter()
            train_epoch(model, opt, x, y, loss_for_epoch(cfg, r), cfg.batch_size, torch.Generator().manual_seed(r))
            if r:
                times[loss].append(time.perf_counter() - t0)
    med = {loss: statistics.median(t) for loss, t in times.items()}
    name = TrainConfig(modules=args.modules, hidden=args.hidden).name
    print(f"{name}, {len(y)} images per pass, batch 100, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for loss in LOSSES:
        print(f"  {loss:8s} {med[loss]:7.3f} s   {med[loss] / med['modular']:.3f}x modular")


if __name__ == "__main__":
    main()
