"""The `quorum` command's arguments: train | export | quantize | pack | serve | demo | sweep | robustness |
calibration | ood | specialists | report | compress. `quorum.commands` holds what each does."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

log = logging.getLogger("quorum")


def _train_args(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that a resumed run can tell which options were given explicitly;
    # the effective defaults come from TrainConfig and are shown in the help.
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="mlp | convnet | treenet | densenet_bc (default: mlp)")
    g.add_argument("--modules", "-M", type=int, help="M, modules in the ensemble (default: 256)")
    g.add_argument(
        "--hidden",
        "-H",
        help="mlp: H, hidden units per module (one hidden layer), or the units of each of 2 to 4 hidden "
        "layers, e.g. 64,64 (default: 4)",
    )
    g.add_argument(
        "--filters",
        help="convnet, treenet: output channels of each 3x3 layer, e.g. 32,64,64, or a preset: cifar10 (the "
        "joint-training paper's Table 3), c3..c7 (the supplement's Table 2) (default: cifar10)",
    )
    g.add_argument("--strides", help="convnet, treenet: stride of each layer, e.g. 1,2,1 (default: the preset's, or 1)")
    g.add_argument("--padding", type=int, help="convnet, treenet: zero padding of each layer (default: preset's, or 1)")
    g.add_argument("--split", type=int, help="treenet: layers in the shared trunk (default: about the first half)")
    g.add_argument(
        "--preset",
        choices=["DN-100-12-4", "DN-82-8-8", "DN-64-6-16"],
        help="densenet_bc: the papers' ensembles (depth-growth-modules); sets --depth, --growth and --modules",
    )
    g.add_argument("--depth", type=int, help="densenet_bc: depth, 6n + 4 (default: 100)")
    g.add_argument("--growth", type=int, help="densenet_bc: growth rate k (default: 12)")
    g = p.add_argument_group("loss and optimizer")
    g.add_argument(
        "--loss",
        choices=["modular", "mcl", "prefix", "dropout"],
        help="modular: the modular loss with --lam (default); mcl: Multiple Choice Learning (Lee et al. §6.2): "
        "each example trains only its --mcl-k best modules; prefix: the modular loss plus the combined NLL of the "
        "prefixes 1, 2, 4, …, M of the module order, so that export can ship that order as the anytime order; "
        "dropout: the same with a random order each step (trains for random removal)",
    )
    g.add_argument(
        "--prefix-weights",
        choices=["uniform", "small"],
        help="prefix, dropout: weight of each prefix length: uniform over 1, 2, 4, …, M, or small (∝ 1/length: "
        "every prefix's NLL counts the same, half the weight on budget 1) (default: uniform)",
    )
    g.add_argument(
        "--prefix-scale", type=float, help="prefix, dropout: weight of the prefix term against L_λ (default: 1)"
    )
    g.add_argument("--mcl-k", type=int, help="mcl: modules each example trains (default: 1)")
    g.add_argument("--pretrain-epochs", type=int, help="mcl: epochs of independent cross-entropy first (default: 0)")
    g.add_argument(
        "--weight-decay", type=float, help="weight decay as for one module trained alone (applied /M; default: 0)"
    )
    g.add_argument(
        "--lam",
        type=float,
        help="modular-loss coefficient λ in [0, 1]: 0 = independent modules, 1 = one joint network; "
        "0.95-0.99 keeps joint accuracy and degrades gracefully (default: 0.99)",
    )
    g.add_argument("--epochs", type=int, help="epochs to train; the best validation epoch is kept (default: 10)")
    g.add_argument("--lr", type=float, help="SGD learning rate (default: 0.02·M for mlp, 0.1·M for the others)")
    g.add_argument("--batch-size", type=int, help="minibatch size (default: 100)")
    g.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        help="learning rate per step: constant (the papers'), or cosine: linear warmup over --warmup-epochs, then "
        "a half cosine to 0 at the last epoch; a cosine run keeps its --epochs when resumed (default: constant)",
    )
    g.add_argument("--warmup-epochs", type=float, help="cosine: epochs of linear warmup to --lr (default: 1)")
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better validation error")
    g.add_argument(
        "--dominance-epoch",
        type=int,
        help="after this epoch, warn if one module carries the ensemble (over capacity for joint training); "
        "0 = off (default: 3)",
    )
    g.add_argument("--seed", type=int, help="seeds the split, subset, init and shuffles (default: 0)")
    g = p.add_argument_group("data and device")
    g.add_argument(
        "--data-dir",
        help="folder of the Fashion-MNIST IDX .gz files (default: $QUORUM_DATA_DIR or Debian's), or of CIFAR "
        "(default: $QUORUM_DATA_DIR/cifar or ~/.cache/quorum/cifar)",
    )
    g.add_argument("--val-size", type=int, help="training images held out for validation (default: 10000)")
    g.add_argument("--subset", type=int, help="train on only N training images (smoke tests)")
    g.add_argument(
        "--dataset",
        choices=["fashion-mnist", "cifar10", "cifar100", "diabetes", "linnerud"],
        help="fashion-mnist (Debian's package); cifar10, cifar100 through torchvision, downloaded into --data-dir "
        "when the internet is reachable; diabetes (regression: Gaussian targets) and linnerud (counts: Poisson "
        "targets), both shipped with scikit-learn (default: fashion-mnist)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random crop and horizontal flip of image batches, also of Fashion-MNIST's for an MLP (default: on "
        "for CIFAR)",
    )
    g.add_argument(
        "--augment-pad", type=int, help="--augment: zero padding of the crop, the largest shift in pixels (default: 4)"
    )
    g.add_argument(
        "--augment-flip",
        action=argparse.BooleanOptionalAction,
        help="--augment: mirror half the images left-right (default: on)",
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: auto)")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast dtype: auto = bf16 on CUDA where supported, fp32 on the CPU; bf16 also runs on the CPU; "
        "fp16 needs CUDA (default: auto)",
    )
    g.add_argument("--log-every", type=int, help="steps between progress updates, the only host syncs (default: 50)")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        help="reduced precision: most test-accuracy points any standard budget may lose against FP32 (default: 0.5)",
    )
    p.add_argument(
        "--method",
        choices=["weights", "static"],
        default="weights",
        help="int8: weights (default): int8 weights dequantized in the graph, float activations, a packed graph "
        "the runtime verifies as at FP32; static: ONNX Runtime's static quantization, int8 activations "
        "calibrated on validation images, no packed graph (docs/RESULTS.md compares the two)",
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=1000,
        help="int8 static: validation images that calibrate the activation ranges (default: 1000)",
    )


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
        description="Export a run's best epoch (or its last, --checkpoint last): modules/mNNN.onnx (each checked "
        "with onnx.checker and against torch on real validation images) and a typed manifest.json.",
    )
    p.add_argument("run", help="run directory written by `quorum train`")
    p.add_argument("--out", required=True, help="bundle directory, e.g. bundles/demo")
    p.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="best: best.pt, the epoch with the lowest validation error of the whole ensemble (default); "
        "last: last.pt, the last finished epoch. Long-trained λ = 0.99 ensembles keep more accuracy with "
        "most modules removed at the last epoch (docs/RESULTS.md)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--data-dir", help="Fashion-MNIST folder, if not the one the run used")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16"],
        default="fp32",
        help="fp32 (default); int8: statically quantized graphs for small CPUs; fp16: float16 graphs for GPUs. "
        "Reduced precision is made from the FP32 export as `quorum quantize` makes it, and refused beyond "
        "--tolerance",
    )
    _quantize_args(p)

    p = sub.add_parser(
        "quantize",
        help="make an INT8 (or FP16) bundle from an FP32 bundle, refused if it loses accuracy",
        description="Quantize every module graph with ONNX Runtime's static quantization (QDQ, int8 weights per "
        "channel, int8 activations calibrated on validation images of the bundle's dataset) and store the packed "
        "graph's weights as int8; or convert every graph to float16 (--precision fp16). Graph inputs and outputs "
        "stay float32. The manifest records the precision and the test accuracy at budgets 1, 8, 32, 128, 256 "
        "and M beside the FP32 source's; a bundle that loses more than --tolerance points at any of them is refused, "
        "with the numbers, and nothing is written.",
        epilog="Example: quorum quantize bundles/demo --out bundles/demo-int8",
    )
    p.add_argument("bundle", help="FP32 bundle directory written by `quorum export`")
    p.add_argument("--out", required=True, help="new bundle directory, e.g. bundles/demo-int8")
    p.add_argument("--precision", choices=["int8", "fp16"], default="int8", help="int8 (default) or fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--data-dir", help="dataset folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument(
        "--val-size",
        type=int,
        default=10_000,
        help="training images the run held out for validation, as `quorum train --val-size` (default: 10000)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _quantize_args(p)

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
    p.add_argument(
        "--executor",
        choices=["auto", "packed", "isolated"],
        default=None,
        help="packed: any budget in one call of the bundle's packed graph; isolated: one session per module, "
        "concurrent, each under --module-timeout-ms; auto (default): packed when the bundle has one that verifies",
    )
    p.add_argument(
        "--module-timeout-ms",
        type=float,
        default=None,
        help="time one module run may take from its start (isolated path; default: 1000); a request ends by twice this",
    )
    shard = p.add_mutually_exclusive_group()
    shard.add_argument(
        "--modules",
        default=None,
        help="serve only these modules, a shard of the bundle for `quorum gateway`: ids and ranges, e.g. 0-63",
    )
    shard.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="serve the I-th of N equal blocks of the bundle's module ids (1-based), e.g. 1/4",
    )

    p = sub.add_parser(
        "gateway",
        help="serve the public API over shards (each a `quorum serve --shard I/N` of one bundle)",
        description="Answer /predict and /v2 by fanning each request out to the shards that hold its planned "
        "modules, concurrently, and combining their partial sums. A shard that is down, refuses, stalls or "
        "answers garbage costs only its modules: they are listed as failed and the answer is degraded. Needs "
        "neither torch nor ONNX Runtime. Settings also come from QUORUM_* environment variables.",
        epilog="Example: quorum serve bundles/demo --shard 1/2 --port 8001 & quorum serve bundles/demo --shard 2/2 "
        "--port 8002 & quorum gateway --shard http://127.0.0.1:8001 --shard http://127.0.0.1:8002 --port 8000",
    )
    p.add_argument("--shard", action="append", required=True, metavar="URL", help="a shard's base URL (repeat)")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: 8000)")
    p.add_argument(
        "--shard-timeout-ms",
        type=float,
        default=None,
        help="time a shard may take to answer a request without a deadline (default: 2000)",
    )
    p.add_argument(
        "--health-interval-s", type=float, default=None, help="time between health checks of every shard (default: 0.5)"
    )
    p.add_argument(
        "--coalesce-rows",
        type=int,
        default=None,
        help="most inputs in one call to a shard that carries concurrent requests for the same modules together "
        "(default: 256; 0: one call per request)",
    )

    p = sub.add_parser(
        "pack",
        help="add a packed graph (all modules in one ONNX graph) to an older bundle",
        description="Write BUNDLE/packed.onnx from the bundle's verified module graphs and list it in the "
        "manifest, so the runtime answers any budget in one call. `quorum export` already does this.",
    )
    p.add_argument("bundle", help="bundle directory written by `quorum export`")

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

    p = sub.add_parser(
        "sweep",
        help="train every (configuration, λ, trial) and tabulate test error against λ (Webb et al. Fig. 2)",
        description="The λ sweep of Webb et al. §4.1: for every configuration M-M-H-H, λ and trial, train a run "
        "into OUT/runs/<config>/lam<λ>/seed<s> (trial t uses seed --seed + t: the same split and initial weights "
        "for every λ), keep the best validation epoch and measure its test error. Writes sweep.json, sweep.md "
        "(mean ± standard error over trials, the paper's Table 2 beside it), sweep.png (Fig. 2) and sweep_nll.png "
        "(Fig. 3). Finished runs are reused and interrupted ones resumed, so re-running the command continues a "
        "sweep, and several invocations into one OUT fill one table.",
        epilog="Reduced run (about 20-30 min on 2 CPU cores): quorum sweep --out sweeps/reduced "
        "--configs 256-M-4-H,1-M-1024-H --lams 0,0.95,0.99,1 --trials 3 --epochs 10",
    )
    p.add_argument("--out", required=True, help="sweep folder: runs/ and the tables and plots")
    p.add_argument(
        "--configs",
        help="comma-separated configurations M-M-H-H (default: 1-M-1024-H,16-M-64-H,64-M-16-H,256-M-4-H)",
    )
    p.add_argument(
        "--lams",
        help="comma-separated λ values in [0, 1] (default: 0,0.5,0.8,0.9,0.95,0.99,1)",
    )
    p.add_argument("--trials", type=int, default=3, help="trials (seeds) per configuration and λ (default: 3)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run; best validation epoch kept (default: 10)")
    p.add_argument("--patience", type=int, help="early stopping: epochs without a better validation error")
    p.add_argument("--seed", type=int, default=0, help="seed of trial 0 (default: 0)")
    p.add_argument("--lr", type=float, help="SGD learning rate for every run (default: the trainer's 0.02·M)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, in worker processes (default: 1)")
    p.add_argument(
        "--loss",
        choices=["modular", "prefix", "dropout"],
        default="modular",
        help="every run's --loss (see quorum train --help); one sweep folder per loss (default: modular)",
    )
    p.add_argument(
        "--prefix-weights",
        choices=["uniform", "small"],
        default="uniform",
        help="prefix, dropout: weights of the prefix lengths (default: uniform)",
    )
    p.add_argument(
        "--prefix-scale",
        type=float,
        default=1.0,
        help="prefix, dropout: weight of the prefix term against L_λ (default: 1)",
    )
    p.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="every run's learning-rate schedule (default: constant)",
    )
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="cosine: epochs of linear warmup (default: 1)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="every run's weight decay, as for one module trained alone (default: 0)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="flip-and-crop augmentation of every run's training images (default: off)",
    )
    p.add_argument("--augment-pad", type=int, default=4, help="--augment: the largest shift in pixels (default: 4)")
    p.add_argument(
        "--no-augment-flip",
        dest="augment_flip",
        action="store_false",
        help="--augment: shifts only, no left-right mirroring",
    )
    p.add_argument("--subset", type=int, help="train on only this many images (smoke tests)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device (default: auto)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "anytime",
        help="anytime accuracy of trained sweeps: prefix-aware losses against the modular loss",
        description="For every finished run of the given sweep folders (quorum sweep, any --loss), at its best "
        "validation epoch: the anytime order quorum export would ship (greedy on validation, or a prefix run's "
        "trained order where it validates better) and its test accuracy at budgets 1, 2, 4, …, M; the whole "
        "ensemble's test error; test accuracy with 50 %% and 90 %% of the modules removed at random. Each run's "
        "numbers are kept in RUN/anytime.json; the variants (loss, weights, schedule, λ) are aggregated over seeds "
        "into OUT/anytime.json, anytime.md and anytime.png.",
        epilog="Example: quorum anytime sweeps/i22-modular sweeps/i22-prefix-uniform sweeps/i22-dropout "
        "--out reports/anytime",
    )
    p.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep folders written by `quorum sweep`")
    p.add_argument("--out", required=True, help="folder for anytime.json, anytime.md and anytime.png")
    p.add_argument("--trials", type=int, default=20, help="random subsets per removal fraction (default: 20)")
    p.add_argument(
        "--unfinished",
        action="store_true",
        help="also runs still training, at their best epoch so far (the table gives each run's epochs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the random subsets (default: 0)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "robustness",
        help="accuracy as modules are removed at random, anytime order vs random subsets; a CI gate",
        description="Webb et al.'s Fig. 4 for one or more bundles: test accuracy with 0, s, 2s, ... M-1 modules "
        "removed at random (--trials subsets per point), and the anytime order's prefix against random subsets "
        "of the same size, with the 95 % interval of its margin (paired by image). Writes robustness.json and "
        "robustness.png to --out and prints a table. Needs no torch "
        "(pip install 'quorum[report]'). With --require, exits 1 when a requirement fails.",
        epilog="Example: quorum robustness bundles/lam0 bundles/lam099 bundles/lam1 --out reports/robustness "
        '--require "drop=0.5:acc>=0.85" --require "drop=0.9:min_acc>=0.7"',
    )
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories written by `quorum export`")
    p.add_argument("--out", required=True, help="folder for robustness.json and robustness.png")
    p.add_argument("--trials", type=int, default=20, help="random subsets per number of removed modules (default: 20)")
    p.add_argument("--step", type=int, help="modules removed between points (default: M/20 rounded, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random subsets (default: 0)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="images to evaluate on (default: test)")
    p.add_argument("--limit", type=int, help="only the first N images of the split (quick looks)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime device")
    p.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="SPEC",
        type=_requirement,
        help='gate checked on every bundle, repeatable: "drop=D:METRIC OP VALUE", e.g. "drop=0.5:acc>=0.85"; '
        "D = fraction in [0, 1) or count of modules removed; METRIC = acc (mean over trials) or min_acc "
        "(worst trial); OP = >= > <= <",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "calibration",
        help="how well a bundle's probabilities are calibrated per budget, and adaptive against fixed budgets",
        description="On the Fashion-MNIST test split: ECE and NLL at budgets 1, 2, 4, ..., M of the anytime order, "
        "before and after the bundle's temperatures, and of p_correct beside the ECE a perfectly calibrated bundle "
        "would measure on splits of these sizes, and how far the mean p_correct lies from the accuracy on the "
        "validation and the test split (above 0: it promises more than that split delivers); then budget=auto at "
        "each fitted tolerance against fixed budgets at the same mean number of modules, and the fewest modules "
        "within 0.1 point of the whole ensemble with its spread over 1,000 resamples of the test images. With "
        "--plot, a PNG of reliability diagrams and the accuracy-against-modules curve. --write fits temperatures "
        "and thresholds on the run's validation split and stores them in the manifest (for bundles exported before "
        "they existed, or before the exit signal of schema version 6). Needs no torch.",
        epilog="Example: quorum calibration bundles/demo --write --plot reports/calibration.png",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by `quorum export`")
    p.add_argument("--write", action="store_true", help="(re)fit on the validation split and store in the manifest")
    p.add_argument("--plot", metavar="PNG", help="write reliability diagrams and the adaptive curve here")
    p.add_argument("--limit", type=int, help="only the first N test images (quick looks)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")

    p = sub.add_parser(
        "ood",
        help="how well each uncertainty signal tells test images from inputs the ensemble never saw",
        description="AUROC of entropy, mutual information, vote share and top probability for the Fashion-MNIST "
        "test split against scikit-learn's 8x8 digits scaled to 28x28, inverted test images and noised test "
        "images, at several budgets of the anytime order. Needs no torch (scikit-learn for the digits).",
        epilog="Example: quorum ood bundles/demo --budgets 8,256",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by `quorum export`")
    p.add_argument("--budgets", help="comma-separated budgets (default: 1, 8, 32 and M)")
    p.add_argument("--limit", type=int, help="only the first N test images (quick looks)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")

    p = sub.add_parser(
        "specialists",
        help="one-vs-all specialist sub-ensembles: ours against the paper's best-of-200 and baselines",
        description="Webb et al.'s Fig. 5 for one or more bundles: every class is a one-vs-all problem scored by "
        "F1. The test set is split into two random halves; k-module subsets are selected on one and every method "
        "is reported on the other: one random module, a random k-subset, the best of --tries random k-subsets "
        "(the paper), ours (greedy forward selection on F1 plus single swaps) and the full ensemble. Writes "
        "specialists.json, specialists.md and specialists.png (mean F1 against λ) to --out.",
        epilog="Example: quorum specialists bundles/lam0 bundles/lam0.5 bundles/lam0.9 bundles/lam0.99 bundles/lam1 "
        "--out reports/specialists",
    )
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories written by `quorum export`")
    p.add_argument("--out", required=True, help="folder for specialists.json, .md and .png")
    p.add_argument("-k", type=int, default=20, help="modules per specialist subset (default: 20)")
    p.add_argument("--tries", type=int, default=200, help="random subsets for the paper's best-of (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seeds the test-set halves and random subsets (default: 0)")
    p.add_argument("--limit", type=int, help="only the first N test images (quick looks)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime device")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "report",
        help="plot a run's ensemble vs member error; module entropy and dominance",
        description="Read a run's metrics.jsonl and best.pt; write report.png (validation error per epoch of the "
        "ensemble against its modules: median, min-max band, the module best at the dominance epoch and the one "
        "best at the end) and report.json, and print a summary: test errors, per-module output entropy on the "
        "test set (min, max, mean, std over modules, in nats) and the module-dominance check.",
        epilog="Example: quorum report runs/demo",
    )
    p.add_argument("run", help="run directory written by `quorum train`")
    p.add_argument("--out", help="folder for report.png and report.json (default: the run directory)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder, if not the one the run used")

    p = sub.add_parser(
        "compress",
        help="merge modules of an MLP ensemble into one network, written as a one-module bundle",
        description="Merge some modules of an MLP ensemble (a bundle, or a run directory) into one network of a "
        "module's size, and write it as a bundle of one module that `quorum serve` answers from; its manifest "
        "records the method, the members and the source. Methods: naive (average the weights), match (weight "
        "matching: align every member's hidden units to the first member's by exact linear assignments, then "
        "average; no data), permavg (learn soft permutations with the Sinkhorn operator on the training split, "
        "then average: the permAVG thesis, 20 epochs of Adam at lr 0.1), distill (train a fresh network on the "
        "members' combined prediction and the labels, α = 0.9). Prints validation and test error of the merged "
        "network, of the members' ensemble and of each member alone, and the seconds the method took.",
        epilog="Example: quorum compress bundles/demo --method match --budget 8 --out bundles/demo-match8",
    )
    p.add_argument("source", help="bundle folder (manifest.json) or run directory (config.json) of --arch mlp")
    p.add_argument("--method", required=True, choices=["permavg", "match", "distill", "naive"])
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--members", help="module ids to merge, e.g. 0,1; the first is the reference")
    who.add_argument("--budget", type=int, help="merge the first b modules of the bundle's anytime order")
    p.add_argument("--out", required=True, help="bundle folder to write, e.g. bundles/demo-match8")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--epochs", type=int, help="permavg: epochs (default: 20); distill: (default: the source's)")
    p.add_argument("--batch-size", type=int, default=100, help="permavg, distill: minibatch size (default: 100)")
    p.add_argument("--tau", type=float, default=1.0, help="permavg: Sinkhorn temperature (default: 1)")
    p.add_argument("--alpha", type=float, default=0.9, help="distill: weight of the soft targets (default: 0.9)")
    p.add_argument("--temperature", type=float, default=4.0, help="distill: softmax temperature (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="shuffles and the student's initialization (default: 0)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $QUORUM_DATA_DIR or Debian's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _requirement(text: str) -> Any:
    """argparse type of --require: a malformed spec is a usage error that shows the syntax."""
    from quorum.experiments.robustness import Requirement
    from quorum.runtime.errors import InvalidRequest

    try:
        return Requirement.parse(text)
    except InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from quorum.commands import HANDLERS

    handler = HANDLERS[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"\nquorum {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name == "onnxruntime":
            print(
                f"quorum {args.command}: needs ONNX Runtime, which comes with one of two extras: "
                "pip install 'quorum[cpu]' (any machine), or 'quorum[gpu]' (CUDA)",
                file=sys.stderr,
            )
            return 2
        if e.name not in _TRAIN_EXTRAS:
            raise
        print(
            f"quorum {args.command}: needs {e.name}, which comes with the training extras: pip install 'quorum[train]'",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        from quorum.core.errors import QuorumError  # every error that carries a message for the user

        if not isinstance(e, QuorumError):
            raise  # a bug: keep the traceback
        print(f"quorum {args.command}: error: {e}", file=sys.stderr)
        return 2


_TRAIN_EXTRAS = frozenset({"torch", "torchvision", "onnx", "onnxscript", "tqdm", "scipy"})
