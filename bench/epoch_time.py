"""Seconds per training epoch of the papers' GPU workloads, through the trainer's own `train_epoch`.

    python bench/epoch_time.py                     # on CUDA when torch sees it, else the CPU
    python bench/epoch_time.py --device cpu --images 2000 --epochs 1   # a smoke run, not a benchmark

  mlp        256-M-4-H on Fashion-MNIST (the 50,000 training images left after the validation
             hold-out), the modular loss at λ = 0.99, batch 100
  densenet   DN-64-6-16 (16 DenseNet-BC modules, depth 64, growth 6) on CIFAR-shaped data: 50,000
             random 3x32x32 images and 100 classes (the shapes and the arithmetic of CIFAR-100;
             no download), flip-and-crop augmentation, λ = 0.99, batch 64 as in the papers

Each workload runs one untimed warm-up epoch, then `--epochs` timed ones (median), under the
trainer's autocast (`--precision`, default auto: bf16 on CUDA where supported) and with the
convolutions channels_last, as the trainer runs them. Timings include the host syncs the trainer makes (every
--log-every steps) and end with a device synchronize.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from quorum.trainer.config import TrainConfig
from quorum.trainer.data import augment as flip_and_crop
from quorum.trainer.loss import modular_loss
from quorum.trainer.models import create
from quorum.trainer.train import autocast_dtype, load_data, resolve_device, train_epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    epochs: int,
    augment: bool,
) -> list[float]:
    """Seconds of `epochs` timed epochs after one warm-up epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9)
    augment_batch = partial(flip_and_crop, pad=cfg.augment_pad, flip=cfg.augment_flip) if augment else None
    dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    times = []
    for epoch in range(epochs + 1):
        _sync(device)
        t0 = time.perf_counter()
        train_epoch(
            model, opt, x, y, lambda logits, t: modular_loss(logits, t, cfg.lam), cfg.batch_size,
            torch.Generator().manual_seed(epoch), augment_batch=augment_batch, autocast=dtype, scaler=scaler,
            log_every=cfg.log_every,
        )  # fmt: skip
        _sync(device)
        if epoch:  # the first is the warm-up: kernel selection, allocator, caches
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per workload (the median is reported)")
    p.add_argument("--images", type=int, help="train on only N images of each workload (a smoke run)")
    p.add_argument("--only", choices=["mlp", "densenet"], help="run one workload")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    results = {}

    if args.only in (None, "mlp"):
        cfg = TrainConfig(modules=256, hidden=4, lam=0.99, precision=args.precision, subset=args.images)
        data, in_shape = load_data(cfg)
        torch.manual_seed(0)
        model = create("mlp", num_modules=256, hidden=4, in_shape=in_shape, num_classes=10).to(device)
        x, y = data.train.x.to(device), data.train.y.to(device)
        results["mlp 256-M-4-H, Fashion-MNIST"] = (len(y), time_epochs(model, x, y, cfg, device, args.epochs, False))

    if args.only in (None, "densenet"):
        cfg = TrainConfig(
            arch="densenet_bc", modules=16, depth=64, growth=6, lam=0.99, batch_size=64, precision=args.precision
        )
        n = args.images or 50_000
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 100, (n,), generator=gen).to(device)
        torch.manual_seed(0)
        model = create("densenet_bc", num_modules=16, in_shape=(3, 32, 32), num_classes=100, depth=64, growth=6)
        model = model.to(device, memory_format=torch.channels_last)  # as the trainer does
        results["densenet_bc DN-64-6-16, CIFAR-shaped"] = (n, time_epochs(model, x, y, cfg, device, args.epochs, True))

    print(f"device: {name}; precision {args.precision}; {args.epochs} timed epochs after one warm-up")
    rows = {}
    for workload, (n, times) in results.items():
        median = statistics.median(times)
        rows[workload] = {"images": n, "seconds_per_epoch": round(median, 3), "epochs": [round(t, 3) for t in times]}
        print(
            f"  {workload:<40} {n:>6} images  {median:8.2f} s/epoch  (epochs: {', '.join(f'{t:.2f}' for t in times)})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "precision": args.precision, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
