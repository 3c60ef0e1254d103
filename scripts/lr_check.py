"""Check the default learning rate of `quorum train` (0.02·M) against a third and twice that.

Trains 256-M-4-H on Fashion-MNIST for each (λ, lr) pair and prints the best validation
error, its epoch, and the test error of that epoch's weights. Run on a GPU for speed:

    python scripts/lr_check.py --epochs 40 --out runs/lr-check [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quorum.trainer.config import TrainConfig
from quorum.trainer.data import load_fashion_mnist
from quorum.trainer.evaluate import evaluate
from quorum.trainer.run import load_best
from quorum.trainer.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--modules", type=int, default=256)
    p.add_argument("--hidden", type=int, default=4)
    p.add_argument("--lams", type=float, nargs="+", default=[0.95, 0.99, 1.0])
    p.add_argument("--lr-per-module", type=float, nargs="+", default=[0.02 / 3, 0.02, 0.04])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/lr-check")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    data = load_fashion_mnist()
    rows = []
    for lam in args.lams:
        for per in args.lr_per_module:
            lr = per * args.modules
            out = Path(args.out) / f"lam{lam}-lr{lr:.3g}"
            cfg = TrainConfig(
                modules=args.modules,
                hidden=args.hidden,
                lam=lam,
                lr=lr,
                epochs=args.epochs,
                device=args.device,
                command="scripts/lr_check.py",
            )
            t0 = time.perf_counter()
            res = train(cfg, out, resume=out.exists(), progress=False)
            secs = time.perf_counter() - t0
            run = load_best(out)
            test = evaluate(run.model, data.test.x, data.test.y)
            row = {
                "lam": lam,
                "lr": lr,
                "lr_per_module": per,
                "best_epoch": res.best_epoch,
                "val_error": res.best_val_error,
                "test_error": test.ensemble_error,
                "seconds": round(secs, 1),
            }
            row["val_curve"] = [round(r["val_error"], 4) for r in run.metrics]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| λ | lr | lr/M | best epoch | val error | test error | train s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lam']} | {r['lr']:.3g} | {r['lr_per_module']:.4f} | {r['best_epoch']} | {r['val_error']:.4f} "
            f"| {r['test_error']:.4f} | {r['seconds']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
