"""The `quorum` command: train | export | serve | demo.

Heavy imports happen inside each subcommand, so `quorum serve` never loads torch and
`quorum --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

log = logging.getLogger("quorum")


def _train_args(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that a resumed run can tell which options were given explicitly;
    # the effective defaults come from TrainConfig and are shown in the help.
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="architecture from the registry (default: mlp)")
    g.add_argument("--modules", "-M", type=int, help="M, modules in the ensemble (default: 256)")
    g.add_argument("--hidden", "-H", type=int, help="H, hidden units per MLP module (default: 4)")
    g = p.add_argument_group("loss and optimizer")
    g.add_argument(
        "--lam",
        type=float,
        help="modular-loss coefficient λ in [0, 1]: 0 = independent modules, 1 = one joint network; "
        "0.95-0.99 keeps joint accuracy and degrades gracefully (default: 0.99)",
    )
    g.add_argument("--epochs", type=int, help="epochs to train; the best validation epoch is kept (default: 10)")
    g.add_argument("--lr", type=float, help="SGD learning rate (default: 0.02·M; see docs/RESULTS.md)")
    g.add_argument("--batch-size", type=int, help="minibatch size (default: 100)")
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better validation error")
    g.add_argument("--seed", type=int, help="seeds the split, subset, init and shuffles (default: 0)")
    g = p.add_argument_group("data and device")
    g.add_argument(
        "--data-dir", help="folder of the Fashion-MNIST IDX .gz files (default: $QUORUM_DATA_DIR or Debian's)"
    )
    g.add_argument("--val-size", type=int, help="training images held out for validation (default: 10000)")
    g.add_argument("--subset", type=int, help="train on only N training images (smoke tests)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quorum",
        description="Train λ-ensembles that degrade gracefully, export them as per-module ONNX bundles, "
        "and serve budgeted predictions over HTTP.",
        epilog="Typical session: quorum train --out runs/a && quorum export runs/a --out bundles/a && "
        "quorum serve bundles/a",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train an ensemble with the modular loss",
        description="Train M same-shaped modules as one batched model with the modular loss "
        "λ·CE(mean logits) + (1−λ)·mean CE(module logits). Writes config.json, metrics.jsonl, "
        "last.pt and best.pt (the epoch with the lowest validation ensemble error) to --out.",
    )
    p.add_argument("--out", required=True, help="run directory, e.g. runs/demo")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars; one log line per epoch")
    _train_args(p)

    p = sub.add_parser(
        "export",
        help="export a run as a bundle of per-module ONNX graphs",
        description="Export a run's best epoch: modules/mNNN.onnx (each checked with onnx.checker and "
        "against torch on real validation images) and a typed manifest.json.",
    )
    p.add_argument("run", help="run directory written by `quorum train`")
    p.add_argument("--out", required=True, help="bundle directory, e.g. bundles/demo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--data-dir", help="Fashion-MNIST folder, if not the one the run used")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP",
        description="Serve POST /predict?budget=B over HTTP. Settings also come from QUORUM_* "
        "environment variables (e.g. QUORUM_MAX_BATCH); flags win.",
    )
    p.add_argument("bundle", help="bundle directory written by `quorum export`")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="ONNX Runtime device")

    p = sub.add_parser(
        "demo",
        help="train, export, evaluate and serve a 256-M-4-H λ=0.99 ensemble",
        description="The whole path on real Fashion-MNIST: train a 256-M-4-H ensemble at λ=0.99 "
        "(resuming if already trained), export it, print test accuracy at budgets 1, 8, 32, 128 and 256 "
        "through the ONNX runtime, then serve it and print a curl to try.",
    )
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    p.add_argument("--name", default="demo", help="run and bundle name (default: demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (default: 8000)")
    p.add_argument("--no-serve", action="store_true", help="stop after the evaluation")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from pathlib import Path

    from quorum.trainer.config import TrainConfig
    from quorum.trainer.train import train

    # every TrainConfig field that is also a command-line option (`command` is recorded, not given)
    keys = [f.name for f in fields(TrainConfig) if f.name != "command" and hasattr(args, f.name)]
    given: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    command = shlex.join(["quorum", *sys.argv[1:]])
    out = Path(args.out)
    if args.resume and (out / "config.json").exists():
        cfg = TrainConfig.load(out / "config.json").resumed_with(given)
    else:
        cfg = TrainConfig(**given, command=command)
    result = train(cfg, out, resume=args.resume, progress=not args.quiet)
    print(
        f"{out}: {result.epochs_done} epochs; best validation error {result.best_val_error:.4f} "
        f"at epoch {result.best_epoch} (best.pt)"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from quorum.exporter.export import export_run

    m = export_run(args.run, args.out, data_dir=args.data_dir, overwrite=args.overwrite, progress=not args.quiet)
    print(
        f"{args.out}: {len(m.modules)} modules, validation error {m.metrics.val_error:.4f}, "
        f"test error {m.metrics.test_error:.4f}"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from quorum.server.main import serve
    from quorum.server.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "device": args.device}.items() if v}
    serve(Settings(bundle=args.bundle, **overrides))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from quorum.demo import run_demo

    return run_demo(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler = {"train": _cmd_train, "export": _cmd_export, "serve": _cmd_serve, "demo": _cmd_demo}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"\nquorum {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in _TRAIN_EXTRAS:
            raise
        print(
            f"quorum {args.command}: needs {e.name}, which comes with the training extras: pip install 'quorum[train]'",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        if not isinstance(e, _domain_errors()):
            raise  # a bug: keep the traceback
        print(f"quorum {args.command}: error: {e}", file=sys.stderr)
        return 2


_TRAIN_EXTRAS = frozenset({"torch", "torchvision", "onnx", "onnxscript", "tqdm"})


def _domain_errors() -> tuple[type[Exception], ...]:
    """Errors that carry a message for the user. Imported late: only the failing path needs them."""
    from quorum.exporter.errors import ExportError
    from quorum.runtime.errors import QuorumError
    from quorum.trainer.errors import TrainerError

    return (TrainerError, ExportError, QuorumError)
