"""`quorum compress`: merge modules of an MLP ensemble into one network of a module's size and
write it as a one-module bundle that `quorum serve` answers from.

    quorum compress bundles/demo --method match --budget 8 --out bundles/demo-match8

Methods (trainer/merge): `naive` averages the weights; `match` aligns every member to the first
by weight matching (exact assignments, no data), then averages; `permavg` learns soft
permutations on the training split (the permAVG thesis, Algorithm 1); `distill` trains a fresh
network on the members' combined prediction (eq. 15). The source is a bundle (modules read from
its graphs; `--budget b` takes the first b of its anytime order) or a run directory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quorum.exporter.compressed import bundle_mlp_layers, write_compressed_bundle
from quorum.exporter.export import input_spec, output_spec, task_spec, training_info
from quorum.runtime.manifest import (
    CompressionInfo,
    EnsembleMetrics,
    InputSpec,
    Manifest,
    OutputSpec,
    TaskSpec,
    TrainingInfo,
)
from quorum.trainer.config import TrainConfig
from quorum.trainer.data import Split, Splits
from quorum.trainer.errors import ConfigError
from quorum.trainer.evaluate import evaluate_logits
from quorum.trainer.merge import (
    DistillConfig,
    Layers,
    PermAvgConfig,
    as_module,
    average,
    distill,
    forward,
    match_average,
    member_layers,
    permavg,
)
from quorum.trainer.run import load_run
from quorum.trainer.train import load_data

__all__ = [
    "METHODS",
    "CompressConfig",
    "Compressed",
    "Source",
    "compress",
    "load_source",
    "merge",
    "split_metrics",
    "write_bundle",
]

METHODS = ("permavg", "match", "distill", "naive")


@dataclass(frozen=True)
class CompressConfig:
    method: str  # one of METHODS
    epochs: int | None = None  # permavg: 20 (thesis); distill: the source's training epochs
    batch_size: int = 100  # permavg and distill minibatches
    tau: float = 1.0  # permavg: Sinkhorn temperature
    alpha: float = 0.9  # distill: weight of the teacher's soft targets (eq. 15)
    temperature: float = 4.0  # distill: softmax temperature of teacher and student
    seed: int = 0  # shuffles; distill: the student's initialization; match: the order layers are visited

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1 or not self.tau > 0:
            raise ConfigError("--epochs and --batch-size must be >= 1 and --tau > 0")
        if not 0 <= self.alpha <= 1 or not self.temperature > 0:
            raise ConfigError(
                f"--alpha must lie in [0, 1] and --temperature be > 0, got {self.alpha}, {self.temperature}"
            )


@dataclass
class Source:
    """An MLP ensemble to compress, with the data its modules were trained on and its manifest parts."""

    path: Path
    modules: list[Layers]  # every module's weights, by id
    order: list[int] | None  # the anytime order (bundles); None for a run directory
    data: Splits
    task: TaskSpec
    input: InputSpec
    output: OutputSpec
    training: TrainingInfo

    def members(self, members: Sequence[int] | None = None, budget: int | None = None) -> list[int]:
        """The module ids to merge: `members` as given, or the first `budget` of the anytime order."""
        M = len(self.modules)
        if (members is None) == (budget is None):
            raise ConfigError("give either --members (e.g. 0,1) or --budget b")
        if budget is not None:
            if self.order is None:
                raise ConfigError(f"{self.path} is a run: the anytime order is chosen at export; pass --members")
            if not 2 <= budget <= M:
                raise ConfigError(f"--budget must lie in 2..{M}, got {budget}")
            return self.order[:budget]
        chosen = list(members or [])
        if len(chosen) < 2 or len(set(chosen)) != len(chosen) or not all(0 <= j < M for j in chosen):
            raise ConfigError(f"--members takes 2 or more distinct module ids in 0..{M - 1}, got {chosen}")
        return chosen


def load_source(path: str | Path, data_dir: str | None = None) -> Source:
    """A bundle (manifest.json) or a run directory (config.json) of an MLP ensemble on a class task."""
    path = Path(path)
    if (path / "manifest.json").exists():
        m = Manifest.load(path)
        if m.training.arch != "mlp" or not m.task.class_names:
            raise ConfigError(f"{path}: compress knows MLP ensembles on classes (--arch mlp), not {m.training.arch}")
        # The run's split, by its seed (default --val-size; a run directory knows its own), preprocessed
        # exactly as the manifest says.
        cfg = TrainConfig(arch="mlp", modules=1, dataset=m.training.dataset, seed=m.training.seed)
        data, _ = load_data(cfg, data_dir)
        _renormalize(data, m.input)
        modules = [
            [(torch.from_numpy(w.copy()), torch.from_numpy(b.copy())) for w, b in bundle_mlp_layers(path, m, j)]
            for j in range(len(m.modules))
        ]
        return Source(path, modules, list(m.anytime_order), data, m.task, m.input, m.output, m.training)
    run = load_run(path)
    if run.config.arch != "mlp" or not run.class_names:
        raise ConfigError(f"{path}: compress knows MLP ensembles on classes (--arch mlp), not {run.config.arch}")
    data, _ = load_data(run.config, data_dir)
    modules = [member_layers(run.model, j) for j in range(run.config.modules)]
    return Source(path, modules, None, data, task_spec(run), input_spec(run), output_spec(run), training_info(run))


def _renormalize(data: Splits, spec: InputSpec) -> None:
    """Preprocess `data`'s flat inputs with the bundle's `spec` instead of the split's own statistics."""
    if len(data.norm.mean) != 1 or len(spec.mean) != 1 or data.norm.scale != spec.scale:
        raise ConfigError("compress knows one-channel MLP inputs (Fashion-MNIST) only")
    for split in (data.train, data.val, data.test):
        raw_scaled = split.x * data.norm.std[0] + data.norm.mean[0]  # x_raw * scale
        split.x = (raw_scaled - spec.mean[0]) / spec.std[0]


@dataclass
class Compressed:
    layers: Layers  # the merged network
    seconds: float  # what the method took (alignment or training)
    val: tuple[float, float]  # (error, NLL) of the merged network
    test: tuple[float, float]
    members_val: tuple[float, float]  # of the members' ensemble (mean logits, softmax)
    members_test: tuple[float, float]
    member_test_errors: list[float] = field(default_factory=list)  # each member alone


def merge(models: Sequence[Layers], train: Split, config: CompressConfig, *, source_epochs: int = 10,
          progress: bool = True) -> Layers:  # fmt: skip
    """The network `config.method` makes of `models` (training on `train` where the method trains)."""
    x, y = train.x.reshape(len(train), -1), train.y
    if config.method == "naive":
        return average(models)
    if config.method == "match":
        return match_average(models, seed=config.seed)
    if config.method == "permavg":
        pc = PermAvgConfig(epochs=config.epochs or 20, tau=config.tau, batch_size=config.batch_size, seed=config.seed)
        return permavg(models, x, y, pc, progress=progress)
    with torch.no_grad():
        teacher = torch.stack([forward(m, x) for m in models]).mean(0)  # (N, K): the ensemble's logits
    dc = DistillConfig(
        epochs=config.epochs or source_epochs, alpha=config.alpha, temperature=config.temperature,
        batch_size=config.batch_size, seed=config.seed,
    )  # fmt: skip
    return distill(models[0], teacher, x, y, dc, progress=progress)


def split_metrics(models: Sequence[Layers], split: Split) -> tuple[float, float, list[float]]:
    """(error, NLL) of the models' ensemble on `split` (one model: itself), and each model's error."""
    with torch.no_grad():
        logits = torch.stack([forward(m, split.x.reshape(len(split), -1)) for m in models], dim=1)  # (N, n, K)
    r = evaluate_logits(logits, split.y)
    return r.ensemble_error, r.ensemble_nll, r.module_errors.tolist()


def compress(source: Source, members: Sequence[int], config: CompressConfig, *, progress: bool = True) -> Compressed:
    """Merge `source`'s modules `members` (the first is the reference) and measure the result."""
    models = [source.modules[j] for j in members]
    t0 = time.perf_counter()
    layers = merge(models, source.data.train, config, source_epochs=source.training.epochs, progress=progress)
    seconds = time.perf_counter() - t0
    val, test = split_metrics([layers], source.data.val), split_metrics([layers], source.data.test)
    ens_val, ens_test = split_metrics(models, source.data.val), split_metrics(models, source.data.test)
    return Compressed(layers, seconds, val[:2], test[:2], ens_val[:2], ens_test[:2], ens_test[2])


def write_bundle(source: Source, members: Sequence[int], result: Compressed, config: CompressConfig,
                 out: str | Path, *, overwrite: bool = False) -> Manifest:  # fmt: skip
    """`result` as a one-module bundle at `out`, with its provenance."""
    module = as_module(result.layers, tuple(source.input.shape))
    x_parity = source.data.val.x[:1000].reshape(-1, *source.input.shape)
    return write_compressed_bundle(
        Path(out), module, task=source.task, input=source.input, output=source.output, training=source.training,
        compression=CompressionInfo(
            method=config.method, members=list(members), source=str(source.path), seconds=result.seconds
        ),
        metrics=EnsembleMetrics(
            val_error=result.val[0], test_error=result.test[0], val_nll=result.val[1], test_nll=result.test[1]
        ),
        x_parity=x_parity, overwrite=overwrite,
    )  # fmt: skip
