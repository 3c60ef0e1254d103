"""The handlers of the `quorum` subcommands: each takes the parsed arguments and returns the exit code.

Heavy imports happen inside each handler, so `quorum serve` never loads torch and `quorum --help`
answers at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

__all__ = ["HANDLERS"]


def cmd_train(args: argparse.Namespace) -> int:
    import logging
    import os
    from dataclasses import fields
    from pathlib import Path

    from quorum.core.errors import QuorumError
    from quorum.trainer.config import TrainConfig
    from quorum.trainer.distributed import Launch, train_distributed
    from quorum.trainer.train import train

    launch = Launch.from_env(os.environ)  # set when torchrun started this process
    rank = launch.rank if launch is not None else 0
    if rank:
        logging.getLogger().setLevel(logging.WARNING)  # progress and logs from rank 0 only
    # every TrainConfig field that is also a command-line option (`command` is recorded, not given)
    keys = [f.name for f in fields(TrainConfig) if f.name != "command" and hasattr(args, f.name)]
    given: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.preset:
        from quorum.trainer.models.densenet import DENSENET_PRESETS

        depth, growth, modules = DENSENET_PRESETS[args.preset]
        given = {"arch": "densenet_bc", "depth": depth, "growth": growth, "modules": modules, **given}
    command = shlex.join(["quorum", *sys.argv[1:]])
    out = Path(args.out)
    # A job that torchrun restarted (--max-restarts) continues the run its first attempt started.
    restarted = launch is not None and launch.restarts > 0 and (out / "config.json").exists()
    resume = args.resume or restarted
    try:
        if resume and (out / "config.json").exists():
            cfg = TrainConfig.load(out / "config.json").resumed_with(given)
        else:
            cfg = TrainConfig(**given, command=command)
        if launch is not None and launch.world_size > 1:
            result = train_distributed(cfg, out, launch=launch, resume=resume, progress=not args.quiet)
        else:
            result = train(cfg, out, resume=resume, progress=not args.quiet)
    except QuorumError:
        if rank:
            return 2  # every rank raises it; rank 0 says it
        raise
    if rank == 0:
        metric = "oracle error" if cfg.loss == "mcl" else cfg.task.metric
        print(
            f"{out}: {result.epochs_done} epochs; best validation {metric} {result.best_val_error:.4f} "
            f"at epoch {result.best_epoch} (best.pt)"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from quorum.core.tasks import get_task
    from quorum.exporter.errors import ExportError
    from quorum.exporter.export import export_run

    out = Path(args.out)
    if args.precision != "fp32" and out.exists() and not args.overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    # reduced precision: the FP32 bundle first, in a temporary sibling, then quantized from it
    out.parent.mkdir(parents=True, exist_ok=True)
    fp32_out = out if args.precision == "fp32" else Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32.", dir=out.parent))
    try:
        m = export_run(
            args.run,
            fp32_out,
            data_dir=args.data_dir,
            overwrite=args.overwrite or fp32_out != out,
            checkpoint=args.checkpoint,
            progress=not args.quiet,
        )
        if args.precision != "fp32":
            from quorum.trainer.config import TrainConfig

            val_size = TrainConfig.load(Path(args.run) / "config.json").val_size  # the run's validation split
            m = _quantize(args, fp32_out, out, val_size)
    finally:
        if fp32_out != out:
            shutil.rmtree(fp32_out, ignore_errors=True)
    metric = get_task(m.task.kind).metric
    print(
        f"{args.out}: {len(m.modules)} {args.precision} modules from epoch {m.training.exported_epoch} "
        f"({m.training.checkpoint}.pt), validation {metric} {m.metrics.val_error:.4f}, test {metric} "
        f"{m.metrics.test_error:.4f}"
    )
    return 0


def _quantize(args: argparse.Namespace, src: Any, out: Any, val_size: int) -> Any:
    """`quorum quantize`'s work, for it and for `quorum export --precision`; prints the accuracy table."""
    from quorum.exporter.quantize import QuantizeConfig, quantize_bundle

    cfg = QuantizeConfig(
        precision=args.precision,
        method=args.method,
        tolerance=args.tolerance,
        calibration=args.calibration,
        val_size=val_size,
        data_dir=args.data_dir,
    )
    m = quantize_bundle(src, out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    assert m.precision is not None
    print(f"test accuracy, {m.precision.dtype} against fp32 (tolerance {m.precision.tolerance:g} points):")
    for a in m.precision.accuracy:
        packed = f", packed {100 * a.packed:.2f} %" if a.packed is not None else ""
        print(f"  budget {a.budget:>4}: fp32 {100 * a.fp32:.2f} %, modules {100 * a.modules:.2f} %{packed}")
    return m


def cmd_quantize(args: argparse.Namespace) -> int:
    m = _quantize(args, args.bundle, args.out, args.val_size)
    print(f"{args.out}: {len(m.modules)} {m.precision.dtype} modules from {args.bundle}")
    return 0


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options among `names` given on the command line: the others keep their settings' defaults
    (or QUORUM_* environment variables)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    from quorum.server.main import serve
    from quorum.server.settings import Settings

    names = ("host", "port", "device", "executor", "module_timeout_ms", "modules", "shard")
    serve(Settings(bundle=args.bundle, **_given(args, names)))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from quorum.server.main import serve_gateway
    from quorum.server.settings import GatewaySettings

    names = ("host", "port", "shard_timeout_ms", "health_interval_s", "coalesce_rows")
    serve_gateway(GatewaySettings(shards=args.shard, **_given(args, names)))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from quorum.exporter.packed import pack_bundle

    m = pack_bundle(args.bundle)
    assert m.packed is not None
    print(f"{args.bundle}: {m.packed.file} holds {len(m.modules)} modules (parity {m.packed.parity:.1e})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from quorum.demo import run_demo

    return run_demo(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from quorum.experiments.sweep import (
        DEFAULT_CONFIGS,
        DEFAULT_LAMS,
        SweepConfig,
        parse_configs,
        parse_lams,
        run_sweep,
    )

    cfg = SweepConfig(
        configs=parse_configs(args.configs) if args.configs else DEFAULT_CONFIGS,
        lams=parse_lams(args.lams) if args.lams else DEFAULT_LAMS,
        trials=args.trials,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        lr=args.lr,
        device=args.device,
        data_dir=args.data_dir,
        subset=args.subset,
        jobs=args.jobs,
        loss=args.loss,
        prefix_weights=args.prefix_weights,
        prefix_scale=args.prefix_scale,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        augment=args.augment,
        augment_pad=args.augment_pad,
        augment_flip=args.augment_flip,
        command=shlex.join(["quorum", *sys.argv[1:]]),
    )
    report = run_sweep(cfg, args.out, progress=not args.quiet)
    print(report.markdown)
    print(f"{args.out}: {report.trained} runs trained, {report.reused} reused; sweep.md, sweep.json, sweep.png")
    for failure in report.failures:
        print(f"quorum sweep: failed: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def cmd_anytime(args: argparse.Namespace) -> int:
    from quorum.experiments.anytime import format_markdown, run_anytime

    if args.trials < 1:
        print("quorum anytime: --trials must be >= 1", file=sys.stderr)
        return 2
    variants = run_anytime(
        args.sweeps,
        args.out,
        trials=args.trials,
        seed=args.seed,
        data_dir=args.data_dir,
        unfinished=args.unfinished,
        progress=not args.quiet,
    )
    print(format_markdown(variants))
    print(f"{args.out}: anytime.md, anytime.json, anytime.png")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    import importlib.util

    if missing := [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]:
        print(f"quorum robustness: needs {', '.join(missing)}: pip install 'quorum[report]'", file=sys.stderr)
        return 2
    from quorum.experiments.robustness import RobustnessConfig
    from quorum.experiments.robustness_report import format_checks, format_table, run_robustness

    cfg = RobustnessConfig(
        trials=args.trials, step=args.step, seed=args.seed, split=args.split, limit=args.limit, device=args.device
    )
    reports = run_robustness(args.bundles, args.out, cfg, args.require, data_dir=args.data_dir, progress=not args.quiet)
    print(format_table(reports))
    lines = format_checks(reports)
    for line in lines:
        print(line)
    print(f"wrote {args.out}/robustness.json and {args.out}/robustness.png")
    failed = [line.removeprefix("FAIL ") for line in lines if line.startswith("FAIL ")]
    if failed:
        print(f"quorum robustness: {len(failed)} of {len(lines)} requirement checks failed:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def cmd_calibration(args: argparse.Namespace) -> int:
    from quorum.experiments.confidence import calibration_report

    report = calibration_report(args.bundle, write=args.write, plot=args.plot, data_dir=args.data_dir, limit=args.limit)
    print(report.table())
    if args.write:
        print(f"wrote temperatures and adaptive thresholds to {args.bundle}/manifest.json")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def cmd_ood(args: argparse.Namespace) -> int:
    from quorum.experiments.confidence import format_ood, ood_report

    try:
        budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else None
    except ValueError:
        print(f"quorum ood: --budgets must be comma-separated integers, got {args.budgets!r}", file=sys.stderr)
        return 2
    print(format_ood(ood_report(args.bundle, budgets=budgets, data_dir=args.data_dir, limit=args.limit)))
    return 0


def cmd_specialists(args: argparse.Namespace) -> int:
    from quorum.experiments.specialists import SpecialistsConfig, run_specialists

    try:
        cfg = SpecialistsConfig(k=args.k, tries=args.tries, seed=args.seed, device=args.device)
    except ValueError as e:
        print(f"quorum specialists: error: {e}", file=sys.stderr)
        return 2
    _, markdown = run_specialists(
        args.bundles, args.out, cfg, data_dir=args.data_dir, limit=args.limit, progress=not args.quiet
    )
    print(markdown)
    print(f"wrote {args.out}/specialists.json, specialists.md and specialists.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from quorum.experiments.report import make_report

    print(make_report(args.run, args.out, data_dir=args.data_dir).summary())
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from quorum.experiments.compress import CompressConfig, compress, load_source, write_bundle

    try:
        members = None if args.members is None else [int(j) for j in args.members.split(",")]
    except ValueError:
        print(f"quorum compress: error: --members takes module ids, e.g. 0,1; got {args.members!r}", file=sys.stderr)
        return 2
    cfg = CompressConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, tau=args.tau, alpha=args.alpha,
        temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    source = load_source(args.source, args.data_dir)
    chosen = source.members(members, args.budget)
    result = compress(source, chosen, cfg, progress=not args.quiet)
    write_bundle(source, chosen, result, cfg, args.out, overwrite=args.overwrite)
    errors = ", ".join(f"{e:.4f}" for e in result.member_test_errors)
    print(
        f"{args.out}: {args.method} of modules {chosen} in {result.seconds:.1f} s; error val {result.val[0]:.4f}, "
        f"test {result.test[0]:.4f} (their ensemble: val {result.members_val[0]:.4f}, "
        f"test {result.members_test[0]:.4f}; each alone, test: {errors})"
    )
    return 0


HANDLERS = {
    "train": cmd_train,
    "export": cmd_export,
    "quantize": cmd_quantize,
    "serve": cmd_serve,
    "gateway": cmd_gateway,
    "pack": cmd_pack,
    "demo": cmd_demo,
    "sweep": cmd_sweep,
    "anytime": cmd_anytime,
    "robustness": cmd_robustness,
    "calibration": cmd_calibration,
    "ood": cmd_ood,
    "specialists": cmd_specialists,
    "report": cmd_report,
    "compress": cmd_compress,
}
