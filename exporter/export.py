"""Export a trained run as a bundle: one ONNX graph per module plus `manifest.json`.

    quorum export runs/demo --out bundles/demo

The bundle is first written into a temporary sibling folder and moved into place only
once every graph has passed `onnx.checker` and torch/ONNX Runtime parity on real
validation images, so a failed export never leaves a half bundle behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from quorum.exporter._candidates import side_by_side
from quorum.exporter.anytime import AnytimeChoice, choose_anytime_order
from quorum.exporter.confidence import cross_fitted_means, fit_confidence
from quorum.exporter.errors import ExportError
from quorum.exporter.graphs import INPUT_NAME, OUTPUT_NAME, cpu_session, serialize, staged_bundle
from quorum.exporter.onnx_graphs import export_graph, export_template, with_weights
from quorum.exporter.packed import write_packed
from quorum.exporter.selection import classifier_anytime_order
from quorum.exporter.specialists import (
    SPECIALIST_CRITERION,
    ensemble_f1,
    random_subsets_f1_by_class,
    select_specialists,
)
from quorum.runtime.confidence import stage_lengths
from quorum.runtime.manifest import (
    PARITY_ATOL,
    PARITY_RTOL,
    EnsembleMetrics,
    InputSpec,
    Manifest,
    ModuleEntry,
    OutputSpec,
    SpecialistEntry,
    TaskSpec,
    TrainingInfo,
    TrunkEntry,
)
from quorum.trainer.evaluate import evaluate_outputs, module_logits
from quorum.trainer.models import Ensemble, arch_info
from quorum.trainer.run import Checkpoint, LoadedRun, load_run
from quorum.trainer.train import load_data

__all__ = [
    "PARITY_ATOL",
    "PARITY_RTOL",
    "SPECIALIST_SIZE",
    "export_run",
    "input_spec",
    "output_spec",
    "task_spec",
    "training_info",
]

log = logging.getLogger(__name__)

SPECIALIST_SIZE = 20  # modules per class specialist (Webb et al. §4.1's k), or M if smaller


def _specialist_entries(
    logits: torch.Tensor, y: torch.Tensor, class_names: list[str], progress: bool
) -> list[SpecialistEntry]:
    """Every class's specialist, chosen on (logits (N, M, K), y), with the F1 of random subsets of its size
    and of the whole ensemble beside it."""
    chosen = select_specialists(logits, y, SPECIALIST_SIZE, progress=progress)
    size = len(chosen[0].modules)  # min(SPECIALIST_SIZE, M) for every class
    random_f1 = random_subsets_f1_by_class(logits, y, [s.class_index for s in chosen], size).mean(dim=1)
    return [
        SpecialistEntry(
            class_index=s.class_index,
            class_name=class_names[s.class_index],
            modules=s.modules,
            val_f1=s.f1,
            random_val_f1=float(random_f1[i]),
            ensemble_val_f1=ensemble_f1(logits, y, s.class_index),
        )
        for i, s in enumerate(chosen)
    ]


def _selections(
    logits: torch.Tensor, y: torch.Tensor, run: LoadedRun, progress: bool
) -> tuple[AnytimeChoice, list[SpecialistEntry]]:
    """The anytime order and (classifiers) the specialists, chosen on (logits (N, M, K), y); the two side by
    side, on half of torch's threads each."""
    task, trained = run.config.task, run.config.loss == "prefix"
    if not task.has_classes:
        return choose_anytime_order(logits, y, task, trained=trained, progress=progress), []
    with side_by_side() as side:
        specialists = side.submit(_specialist_entries, logits, y, run.class_names, progress)
        return choose_anytime_order(logits, y, task, trained=trained, progress=progress), specialists.result()


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    overwrite: bool = False,
    checkpoint: Checkpoint = "best",
    parity_samples: int = 1000,
    progress: bool = True,
) -> Manifest:
    """Export one of `run_dir`'s checkpoints (best: the lowest validation error; last: the last epoch)
    to the bundle folder `out_dir`; return its manifest."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} exists; pass --overwrite to replace it, or choose another --out")
    run = load_run(run_dir, checkpoint)
    cfg, model = run.config, run.model
    data, _ = load_data(cfg, data_dir)

    val_logits = module_logits(model, data.val.x)  # (N, M, K)
    test_logits = module_logits(model, data.test.x)
    task, scale = cfg.task, data.target_scale
    val = evaluate_outputs(val_logits, data.val.y, task, scale)
    test = evaluate_outputs(test_logits, data.test.y, task, scale)
    module_errors = val.module_errors.tolist()
    # Both selections use the validation split, so the bundle's test metrics stay unbiased.
    t0 = time.perf_counter()
    anytime, specialists = _selections(val_logits, data.val.y, run, progress)
    if anytime.trained_val is not None:
        log.info(
            "anytime order: %s (mean validation error over budgets 1, 2, 4, …: trained order %.4f, greedy %.4f)",
            anytime.source,
            np.mean(anytime.trained_val),
            np.mean(anytime.greedy_val),
        )
    log.info("anytime order and %d specialists chosen in %.1f s", len(specialists), time.perf_counter() - t0)
    t0 = time.perf_counter()
    confidence = None
    if task.has_classes:  # an order chosen on these inputs is chosen again on each half for its thresholds
        logits, y = val_logits.cpu().numpy(), data.val.y.cpu().numpy()
        held_out = None
        if anytime.source == "greedy":
            with side_by_side() as side:
                stages = stage_lengths(logits.shape[1])
                held_out = cross_fitted_means(logits, y, stages, classifier_anytime_order, beside=side)
        confidence = fit_confidence(logits, y, anytime.order, held_out=held_out)
    log.info("temperatures, correctness maps and adaptive thresholds fitted in %.1f s", time.perf_counter() - t0)
    x_parity = data.val.x[:parity_samples]

    M = cfg.modules
    trunk = model.trunk()
    if trunk is not None:  # a TreeNet: the branches' graphs start from the trunk's features
        with torch.no_grad():
            branch_in = trunk(x_parity)
    else:
        branch_in = x_parity
    try:
        template: onnx.ModelProto | None = export_template(model.branch(0), branch_in[:2])
    except ExportError as e:
        log.info("exporting module by module (%s)", e)
        template = None
    with staged_bundle(out_dir) as tmp:
        (tmp / "modules").mkdir()
        entries, protos, ort_logits = [], [], []
        for j in tqdm(range(M), desc="export", unit="module", disable=not progress):
            module = model.branch(j)
            doc = f"Quorum module {j} of {M}"
            if template is not None:
                protos.append(with_weights(template, module, doc))
            else:
                protos.append(export_graph(module, branch_in[:2]))
                protos[-1].doc_string = doc
            data_bytes, digest = serialize(protos[-1])
            rel = f"modules/m{j:03d}.onnx"
            (tmp / rel).write_bytes(data_bytes)
            got = cpu_session(data_bytes).run([OUTPUT_NAME], {INPUT_NAME: branch_in.numpy()})[0]
            ort_logits.append(got)
            diff = _check_parity(j, got, val_logits[:parity_samples, j].numpy())
            entries.append(
                ModuleEntry(
                    id=j,
                    file=rel,
                    sha256=digest,
                    params=model.module_params(),
                    flops=model.module_flops(),
                    val_error=module_errors[j],
                    parity=diff,
                )
            )
        packed = None
        if arch_info(cfg.arch).packable(cfg.arch_params()):  # e.g. one-hidden-layer MLPs; the rest run a session each
            packed = write_packed(tmp, protos, INPUT_NAME, OUTPUT_NAME, x_parity.numpy(), np.stack(ort_logits))
        trunk_entry = None if trunk is None else _write_trunk(tmp, trunk, model, x_parity, branch_in)
        manifest = Manifest(
            name=out_dir.name,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            task=task_spec(run),
            input=input_spec(run),
            output=output_spec(run),
            training=training_info(run),
            modules=entries,
            anytime_order=anytime.order,
            anytime_criterion=anytime.criterion,
            anytime_source=anytime.source,
            specialists=specialists,
            specialist_criterion=SPECIALIST_CRITERION if specialists else None,
            packed=packed,
            trunk=trunk_entry,
            confidence=confidence,
            metrics=EnsembleMetrics(
                val_error=val.ensemble_error,
                test_error=test.ensemble_error,
                val_nll=val.ensemble_nll,
                test_nll=test.ensemble_nll,
            ),
        )
        manifest.dump(tmp)
    log.info(
        "exported %d modules to %s (val error %.4f, test error %.4f)",
        M,
        out_dir,
        val.ensemble_error,
        test.ensemble_error,
    )
    return manifest


def task_spec(run: LoadedRun) -> TaskSpec:
    """The manifest's `task` of a run."""
    task = run.config.task
    if task.has_classes:
        return TaskSpec(kind=task.kind, class_names=run.class_names)
    return TaskSpec(kind=task.kind, target_names=run.target_names)


def input_spec(run: LoadedRun) -> InputSpec:
    """The manifest's `input` of a run: tensor name, shape and the exact preprocessing."""
    return InputSpec(
        name=INPUT_NAME,
        shape=list(run.in_shape),
        scale=run.norm.scale,
        mean=list(run.norm.mean),
        std=list(run.norm.std),
        raw_range=(0.0, 255.0) if len(run.in_shape) > 1 or run.config.dataset == "fashion-mnist" else None,
    )


def training_info(run: LoadedRun) -> TrainingInfo:
    """The manifest's `training` of a run: how its modules were trained."""
    cfg = run.config
    return TrainingInfo(
        arch=cfg.arch,
        num_modules=cfg.modules,
        arch_params=cfg.arch_params(),
        lam=cfg.lam,
        dataset=cfg.dataset,
        seed=cfg.seed,
        epochs=run.epochs_done,
        best_epoch=run.best_epoch,
        checkpoint=run.checkpoint,
        exported_epoch=run.epoch,
        lr=cfg.learning_rate,
        batch_size=cfg.batch_size,
        command=cfg.command,
    )


def output_spec(run: LoadedRun) -> OutputSpec:
    """How the runtime combines the modules: the task's combiner, and where targets were standardized
    for training, how to undo it."""
    task = run.config.task
    if task.standardizes_targets:
        return OutputSpec(
            name=OUTPUT_NAME, combiner=task.combiner, target_scale=run.target_scale, target_shift=run.target_shift
        )
    return OutputSpec(name=OUTPUT_NAME, combiner=task.combiner)


TRUNK_FILE = "trunk.onnx"
TRUNK_OUTPUT = "features"


def _write_trunk(
    bundle_dir: Path, trunk: torch.nn.Module, model: Ensemble, x: torch.Tensor, features: torch.Tensor
) -> TrunkEntry:
    """Export the shared trunk to trunk.onnx, checked against torch's features on `x`."""
    data, digest = serialize(export_graph(trunk, x[:2], output_name=TRUNK_OUTPUT))
    (bundle_dir / TRUNK_FILE).write_bytes(data)
    got = cpu_session(data).run([TRUNK_OUTPUT], {INPUT_NAME: x.numpy()})[0]
    expected = features.numpy()
    diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    if not diff <= PARITY_ATOL + PARITY_RTOL * float(np.abs(expected).max()):
        raise ExportError(f"trunk: ONNX Runtime and torch differ by {diff:.2e}")
    return TrunkEntry(
        file=TRUNK_FILE,
        sha256=digest,
        output_shape=list(expected.shape[1:]),
        params=sum(p.numel() for p in trunk.parameters()),
        flops=model.trunk_flops(),
        parity=diff,
    )


def _check_parity(j: int, got: np.ndarray, expected: np.ndarray) -> float:
    """Max |logit difference| of module j; ExportError beyond the tolerance."""
    diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    allowed = PARITY_ATOL + PARITY_RTOL * float(np.abs(expected).max())
    if not diff <= allowed:
        raise ExportError(
            f"module {j}: ONNX Runtime and torch differ by {diff:.2e} (allowed {PARITY_ATOL:g} + "
            f"{PARITY_RTOL:g}·max|logit| = {allowed:.2e})"
        )
    return diff
