"""`quorum demo`: the whole path on real Fashion-MNIST, idempotent.

train (or resume) runs/NAME -> export bundles/NAME (when stale) -> test accuracy at
budgets 1, 8, 32, 128, 256 through the ONNX runtime -> serve, printing a curl to try.
"""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import socket
import sys
import time
from pathlib import Path

import numpy as np

from quorum.exporter.export import export_run
from quorum.runtime.engine import Engine
from quorum.server.main import serve
from quorum.server.settings import Settings
from quorum.trainer.config import TrainConfig
from quorum.trainer.data import load_raw
from quorum.trainer.train import train

__all__ = ["DEMO_BUDGETS", "budget_accuracy", "run_demo"]

DEMO_BUDGETS = (1, 8, 32, 128, 256)


def budget_accuracy(engine: Engine, x_raw: np.ndarray, y: np.ndarray, budgets: tuple[int, ...]) -> dict[int, float]:
    """Test accuracy of the first b modules of the anytime order, for each budget b."""
    out = {}
    for b in budgets:
        if b > engine.num_modules:
            continue
        labels = np.concatenate([engine.predict(x_raw[i : i + 1000], budget=b).labels for i in range(0, len(y), 1000)])
        out[b] = float((labels == y).mean())
    return out


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def run_demo(args: argparse.Namespace) -> int:
    run_dir, bundle_dir = Path("runs") / args.name, Path("bundles") / args.name
    if not args.no_serve and not _port_free(args.host, args.port):
        print(f"quorum demo: port {args.port} on {args.host} is in use; pass --port (make demo PORT=8001)")
        return 2
    t0 = time.perf_counter()
    command = shlex.join(["quorum", *sys.argv[1:]])
    resume = (run_dir / "config.json").exists()
    overrides = {"epochs": args.epochs, "data_dir": args.data_dir}
    if resume:
        cfg = TrainConfig.load(run_dir / "config.json").resumed_with(overrides)
        print(f"== resuming {run_dir} (training stops at epoch {cfg.epochs})")
    else:
        cfg = TrainConfig(arch="mlp", modules=256, hidden=4, lam=0.99, command=command, **overrides)
        print(f"== training {cfg.name} at λ={cfg.lam} for {cfg.epochs} epochs into {run_dir}")
    result = train(cfg, run_dir, resume=resume)
    print(f"   best validation error {result.best_val_error:.4f} at epoch {result.best_epoch}")

    best = run_dir / "best.pt"
    manifest = bundle_dir / "manifest.json"
    if not manifest.exists() or manifest.stat().st_mtime < best.stat().st_mtime:
        print(f"== exporting {run_dir} -> {bundle_dir}")
        export_run(run_dir, bundle_dir, data_dir=args.data_dir, overwrite=True)
    else:
        print(f"== {bundle_dir} is up to date")

    engine = Engine.load(bundle_dir)
    x_test, y_test = load_raw(args.data_dir)["test"]
    acc = budget_accuracy(engine, x_test, y_test, DEMO_BUDGETS)
    m = engine.manifest
    print(f"\n   {m.training.num_modules}-M-{m.training.arch_params.get('hidden')}-H λ={m.training.lam}: "
          f"validation error {m.metrics.val_error:.4f}, test error {m.metrics.test_error:.4f}")  # fmt: skip
    print("   test accuracy by budget (ONNX Runtime, anytime order):")
    for b, a in acc.items():
        print(f"     budget {b:>4}: {a:.4f}")
    print(f"   done in {time.perf_counter() - t0:.0f} s\n")

    request = run_dir / "example-request.json"
    request.write_text(json.dumps({"inputs": x_test[:2].tolist()}))
    curl = (
        f"curl -s -X POST 'http://{args.host}:{args.port}/predict?budget=32' "
        f"-H 'Content-Type: application/json' --data @{request}"
    )
    print(f"Try it (true labels: {', '.join(m.task.class_names[i] for i in y_test[:2])}):\n\n  {curl}\n")
    if args.no_serve:
        return 0
    print(f"== serving {bundle_dir} on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(Settings(bundle=bundle_dir, host=args.host, port=args.port))
    return 0
