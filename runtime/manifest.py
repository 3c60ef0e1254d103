"""The bundle manifest: the one contract between exporter/ and runtime/.

A bundle is a folder:

    manifest.json
    modules/m000.onnx ... m255.onnx
    packed.onnx, packed_core.onnx     (optional: `packed`)
    trunk.onnx                        (optional: `trunk`, schema version 2)

Every module graph stands alone: one float32 input (N, *input.shape), one output of logits
(N, K), dynamic batch axis. In a bundle with a trunk (a TreeNet: layers all modules share),
the trunk graph takes that input and gives features (N, *trunk.output_shape), and the module
graphs take those features: the trunk runs once per request, then the chosen modules. The
packed graph takes the same input and int64 module ids (b,)
and gives the mean of those modules' logits (N, K), then the weights it gathered; the core
takes the input and those weights and gives the same mean logits. Clients preprocess raw inputs as
`x_model = (x_raw * input.scale - input.mean[c]) / input.std[c]`, combine the chosen modules'
logits by their mean, then apply softmax (the normalized geometric mean of the members).
A reduced-precision bundle (`precision`: int8 or fp16 graphs made from an FP32 bundle) takes and
gives the same float32 tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quorum.core.tasks import Task, get_task, list_tasks
from quorum.runtime.errors import BundleError

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "PARITY_ATOL",
    "PARITY_RTOL",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "AdaptiveRule",
    "BudgetAccuracy",
    "CompressionInfo",
    "ConfidenceEntry",
    "CorrectnessMap",
    "EnsembleMetrics",
    "InputSpec",
    "Manifest",
    "ModuleEntry",
    "OutputSpec",
    "PackedEntry",
    "PrecisionInfo",
    "SpecialistEntry",
    "TaskSpec",
    "TrainingInfo",
    "TrunkEntry",
    "probe_input",
]

FORMAT: Literal["quorum-bundle"] = "quorum-bundle"
# 2 added `trunk`, 3 `training.checkpoint` and `training.exported_epoch`, 4 `confidence`, `precision`, `compression`,
# 5 `confidence.correctness`, 6 the exit signal "calibrated top probability, its lead less one standard error"
SCHEMA_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MANIFEST_FILE = "manifest.json"

# Parity of a module graph with its reference (torch at export, the module file for the
# packed graph at load), per module: max |Δ logit| <= ATOL + RTOL * max |logit|. At high λ a
# single module's logits grow large (only the mean over modules is trained), and two correct
# float32 implementations that sum in another order differ by ~1e-6 of that scale: the
# relative term allows ten times that. A wrong graph is off by O(1).
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """A task with classes (classification: K of them) or with D outputs (regression: Gaussian
    targets; count: Poisson targets); `quorum.core.tasks` defines each."""

    kind: str = Field("classification", description="A registered task: classification, regression or count.")
    class_names: list[str] = Field(default_factory=list, description="classification: class k's name.")
    target_names: list[str] = Field(default_factory=list, description="regression, count: output d's name.")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in list_tasks():
            raise ValueError(f"unknown task {kind!r}; this Quorum knows {', '.join(list_tasks())}")
        return kind

    @model_validator(mode="after")
    def _names(self) -> TaskSpec:
        if self.task.has_classes and (len(self.class_names) < 2 or self.target_names):
            raise ValueError(f"a {self.kind} task names its classes (>= 2) in class_names, and no target_names")
        if not self.task.has_classes and (not self.target_names or self.class_names):
            raise ValueError(f"a {self.kind} task names its outputs in target_names, and no class_names")
        return self

    @property
    def task(self) -> Task:
        """The task itself: its combiner, metric and answers."""
        return get_task(self.kind)

    @property
    def num_outputs(self) -> int:
        """K classes, or D outputs: the width of every module's output."""
        return len(self.class_names) or len(self.target_names)


MAX_INPUT_DIMENSIONS = 8  # of one input's shape
MAX_INPUT_ELEMENTS = 2**24  # values in one input: far above any image the modules take


def _check_shape(shape: list[int], what: str) -> list[int]:
    if not all(d >= 1 for d in shape):
        raise ValueError(f"{what} sizes must be positive, got {shape}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"{what} {shape} holds over {MAX_INPUT_ELEMENTS} values")
    return shape


class InputSpec(_Strict):
    name: str = Field(description="Input tensor name of every module graph.")
    shape: list[int] = Field(
        min_length=1, max_length=MAX_INPUT_DIMENSIONS, description="Shape of one input, without the batch axis."
    )
    dtype: Literal["float32"] = "float32"
    scale: float = Field(gt=0, allow_inf_nan=False, description="x_model = (x_raw * scale - mean[c]) / std[c].")
    mean: list[float] = Field(min_length=1, description="Per channel, after scaling.")
    std: list[float] = Field(min_length=1, description="Per channel, after scaling.")
    raw_range: tuple[float, float] | None = Field(None, description="Range of the raw values clients send.")

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: list[int]) -> list[int]:
        return _check_shape(shape, "input.shape")

    @model_validator(mode="after")
    def _channels(self) -> InputSpec:
        if len(self.mean) != len(self.std) or not all(s > 0 and math.isfinite(s) for s in self.std):
            raise ValueError("input.mean and input.std need one entry per channel, std > 0")
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError("input.mean must be finite")
        if self.raw_range is not None and not (
            math.isfinite(self.raw_range[0]) and self.raw_range[0] < self.raw_range[1] < math.inf
        ):
            raise ValueError(f"input.raw_range must be (low, high) with low < high, got {self.raw_range}")
        return self


class OutputSpec(_Strict):
    """How module outputs become a prediction: the mean over the chosen modules of their
    natural parameters, then the family's inverse link.

    mean_logits_softmax  classification: probabilities softmax(mean_j eta_j)
    mean                 regression (Gaussian): value mean_j eta_j * target_scale + target_shift
    mean_exp             count (Poisson): expected count exp(mean_j eta_j)
    """

    name: str = Field(description="Output tensor name of every module graph: (N, K) logits or (N, D) parameters.")
    combiner: str = Field("mean_logits_softmax", description="The task's combiner (quorum.core.tasks).")
    target_scale: list[float] | None = Field(None, description="mean: per output, the training targets' std.")
    target_shift: list[float] | None = Field(None, description="mean: per output, the training targets' mean.")


class TrainingInfo(_Strict):
    arch: str
    num_modules: int = Field(ge=1)
    arch_params: dict[str, int | float | str] = Field(default_factory=dict, description="e.g. hidden units.")
    lam: float = Field(ge=0, le=1, description="Modular-loss coefficient lambda.")
    dataset: str
    seed: int
    epochs: int = Field(description="Epochs trained.")
    best_epoch: int = Field(description="Epoch with the lowest validation error (the run's best.pt).")
    checkpoint: Literal["best", "last"] = Field(
        "best", description="Checkpoint exported: best (best.pt, the lowest validation error) or last (last.pt)."
    )
    exported_epoch: int | None = Field(
        None, description="Epoch whose weights were exported; absent before schema version 3, where it is best_epoch."
    )
    lr: float
    batch_size: int
    command: str = Field(description="The command line that trained the run.")


class ModuleEntry(_Strict):
    id: int = Field(ge=0)
    file: str = Field(description="Path relative to the bundle folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    params: int = Field(ge=0, description="Parameter count.")
    flops: int = Field(ge=0, description="Floating-point operations per input (2 per multiply-add).")
    val_error: float = Field(ge=0, description="Validation error rate; RMSE for regression and count tasks.")
    parity: float = Field(ge=0, description="Max |logit difference| of ONNX Runtime vs torch on validation images.")


class SpecialistEntry(_Strict):
    """A sub-ensemble chosen for one class's one-vs-all question (is the argmax this class?)."""

    class_index: int = Field(ge=0)
    class_name: str
    modules: list[int] = Field(min_length=1, description="Module ids, in the order they were selected.")
    val_f1: float = Field(ge=0, le=1, description="One-vs-all F1 on the validation split, where it was chosen.")
    random_val_f1: float = Field(ge=0, le=1, description="Mean validation F1 of random subsets of the same size.")
    ensemble_val_f1: float = Field(ge=0, le=1, description="The full ensemble's validation F1.")


class PackedEntry(_Strict):
    """An optional graph of every module stacked, that runs any subset in one call."""

    file: str = Field(description="Path relative to the bundle folder, e.g. packed.onnx.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    index_input: str = Field(description="Name of its int64 input (b,): the ids of the modules to combine.")
    parity: float = Field(ge=0, description="Max |Δ mean logit| against the module graphs on validation images.")
    core_file: str | None = Field(
        None, description="The packed graph's second half: (input, *weights) -> mean logits, for cached weights."
    )
    core_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    weights: list[str] = Field(
        default_factory=list, description="Outputs of the packed graph after the logits = inputs of the core."
    )


class TrunkEntry(_Strict):
    """The layers every module shares (a TreeNet's trunk), run once per request."""

    file: str = Field(description="Path relative to the bundle folder, e.g. trunk.onnx.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    output_shape: list[int] = Field(
        min_length=1, max_length=MAX_INPUT_DIMENSIONS, description="Features of one input; the module graphs' input."
    )
    params: int = Field(ge=0)
    flops: int = Field(ge=0, description="Per input (2 per multiply-add); paid once, whatever the budget.")
    parity: float = Field(ge=0, description="Max |feature difference| of ONNX Runtime vs torch on validation images.")

    @field_validator("output_shape")
    @classmethod
    def _shape(cls, shape: list[int]) -> list[int]:
        return _check_shape(shape, "trunk.output_shape")


class BudgetAccuracy(_Strict):
    """Test accuracy of the anytime order's first `budget` modules, reduced and full precision."""

    budget: int = Field(ge=1)
    modules: float = Field(ge=0, le=1, description="Through the module graphs (mean of their logits).")
    packed: float | None = Field(None, ge=0, le=1, description="Through the packed graph, if the bundle has one.")
    fp32: float = Field(ge=0, le=1, description="The FP32 source bundle's module graphs.")


class PrecisionInfo(_Strict):
    """How a reduced-precision bundle was made from its FP32 source, and what it costs in accuracy.
    Absent: every graph is FP32. Graph inputs and outputs stay float32 at every precision; each
    module's `parity` is then against its FP32 graph, on validation images."""

    dtype: Literal["int8", "fp16"]
    activations: Literal["float32", "float16", "int8"] = Field(
        description="What the graphs compute in: float32 (int8 weights dequantized), float16, or int8."
    )
    method: str = Field(description="e.g. static QDQ, per-channel int8 weights, calibrated on validation images.")
    source: str = Field(description="Name of the FP32 bundle it was made from.")
    tolerance: float = Field(ge=0, description="Most test-accuracy points a budget may lose against the source.")
    parity_rtol: float = Field(
        ge=0, description="Packed graph against module graphs at load: max |Δ logit| <= PARITY_ATOL + this·max|logit|."
    )
    accuracy: list[BudgetAccuracy] = Field(description="At the standard budgets up to M, and at M.")

    @property
    def weights_only(self) -> bool:
        """int8 weights under float32 arithmetic: the runtime may dequantize them once, at load."""
        return self.dtype == "int8" and self.activations == "float32"


class CompressionInfo(_Strict):
    """Where a one-module bundle's network came from: an ensemble merged by `quorum compress`."""

    method: str = Field(description="permavg | match | distill | naive")
    members: list[int] = Field(min_length=1, description="Source module ids merged; the first is the reference.")
    source: str = Field(description="The source bundle or run folder.")
    seconds: float = Field(ge=0, description="Compute the merge took (alignment or training), in seconds.")


class EnsembleMetrics(_Strict):
    """Of the whole ensemble: error rates (classification) or RMSEs in the targets' units (regression, count)."""

    val_error: float
    test_error: float
    val_nll: float
    test_nll: float


class AdaptiveRule(_Strict):
    """Exit thresholds for one tolerance: an input leaves after stage s once its calibrated top
    probability reaches thresholds[s] (the last stage lets every input leave)."""

    tolerance: float = Field(ge=0, le=1, description="Accuracy given up against the whole order, on validation.")
    thresholds: list[float] = Field(
        description="One per stage but the last, on the entry's exit signal; 2 (above any probability): never."
    )
    val_accuracy: float = Field(
        ge=0,
        le=1,
        description="On the validation answers the thresholds were chosen on: where the order was chosen on that "
        "split, those of orders chosen on its other half.",
    )
    val_mean_modules: float = Field(ge=0, description="Modules per input on average, on the same answers.")


class CorrectnessMap(_Strict):
    """How often a stage's answer is right, as a function of its calibrated top probability: a
    nondecreasing piecewise-linear map through the knots (top[i], right[i]), constant beyond them."""

    top: list[float] = Field(min_length=1, description="Calibrated top probabilities, increasing, in [0, 1].")
    right: list[float] = Field(min_length=1, description="The share of answers that are right there, in [0, 1].")

    @model_validator(mode="after")
    def _monotone(self) -> CorrectnessMap:
        top, right = np.asarray(self.top), np.asarray(self.right)
        if len(top) != len(right):
            raise ValueError("correctness map: as many values of `right` as of `top`")
        if not (np.isfinite(top).all() and np.isfinite(right).all()):
            raise ValueError("correctness map: finite knots only")
        if (np.diff(top) <= 0).any() or top[0] < 0 or top[-1] > 1:
            raise ValueError("correctness map: `top` must increase within [0, 1]")
        if (np.diff(right) < 0).any() or right[0] < 0 or right[-1] > 1:
            raise ValueError("correctness map: `right` must not decrease and stay within [0, 1]")
        return self


class ConfidenceEntry(_Strict):
    """Calibration and adaptive budgets, fitted on the validation split along the anytime order."""

    stages: list[int] = Field(
        min_length=1,
        description="Prefix lengths of the anytime order, ending at M (exported: 1, 2, 4, ..., 32, 48, 64, 96, ...).",
    )
    temperatures: list[float] = Field(description="Per stage length; other lengths interpolate log T in log b.")
    signal: Literal["calibrated top probability", "calibrated top probability, its lead less one standard error"] = (
        Field(
            description="The exit rule's signal: the calibrated top probability (schema versions 4 and 5), or the "
            "calibrated probability of the same label once its lead over the runner-up is lowered by one standard "
            "error of that lead as an estimate of the whole order's (schema version 6; `runtime.confidence."
            "exit_signal`)."
        )
    )
    rules: list[AdaptiveRule] = Field(min_length=1, description="By increasing tolerance.")
    val_accuracy: float = Field(ge=0, le=1, description="The whole order's, for comparison with the rules'.")
    correctness: list[CorrectnessMap] | None = Field(
        None,
        description="Per stage: the chance an answer is right given its calibrated top probability (isotonic "
        "regression on validation, lowered by the optimism of an order chosen there where it was; schema version "
        "5), served as p_correct; other lengths interpolate in log b. Absent: not fitted.",
    )

    def correctness_knots(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Each stage's map as arrays (top, right), as `runtime.confidence.correctness_at` takes them."""
        if self.correctness is None:
            return None
        return [(np.asarray(c.top), np.asarray(c.right)) for c in self.correctness]

    @model_validator(mode="after")
    def _consistent(self) -> ConfidenceEntry:
        if self.correctness is not None and len(self.correctness) != len(self.stages):
            raise ValueError("confidence.correctness: one map per stage")
        if self.stages != sorted(set(self.stages)) or self.stages[0] < 1:
            raise ValueError("confidence.stages must be increasing prefix lengths >= 1")
        if len(self.temperatures) != len(self.stages) or not all(0 < t < math.inf for t in self.temperatures):
            raise ValueError("confidence.temperatures: one positive temperature per stage")
        if [r.tolerance for r in self.rules] != sorted(r.tolerance for r in self.rules):
            raise ValueError("confidence.rules must be listed by increasing tolerance")
        if any(len(r.thresholds) != len(self.stages) - 1 for r in self.rules):
            raise ValueError("confidence.rules: one threshold per stage but the last")
        return self


class Manifest(_Strict):
    format: Literal["quorum-bundle"] = FORMAT
    version: int = SCHEMA_VERSION
    name: str
    created: str = Field(description="ISO 8601 time of export.")
    task: TaskSpec
    input: InputSpec
    output: OutputSpec
    training: TrainingInfo
    modules: list[ModuleEntry] = Field(min_length=1)
    anytime_order: list[int] = Field(description="Module ids; every prefix is a strong sub-ensemble.")
    anytime_criterion: str = Field(description="How the order was chosen.")
    anytime_source: Literal["greedy", "trained"] = Field(
        "greedy", description="greedy: selected on validation; trained: the module order a prefix-aware loss trained."
    )
    specialists: list[SpecialistEntry] = Field(
        default_factory=list, description="One per class, by class index; empty in bundles without specialists."
    )
    specialist_criterion: str | None = Field(None, description="How the specialist subsets were chosen.")
    packed: PackedEntry | None = Field(
        None, description="All modules in one graph (input, module ids) -> mean logits; absent in older bundles."
    )
    trunk: TrunkEntry | None = Field(
        None, description="Shared layers run before the modules (TreeNets); the module graphs take their output."
    )
    metrics: EnsembleMetrics
    confidence: ConfidenceEntry | None = Field(
        None, description="Temperatures and adaptive-budget thresholds (classification; schema version 4)."
    )
    precision: PrecisionInfo | None = Field(None, description="Reduced precision (schema version 4); absent: FP32.")
    compression: CompressionInfo | None = Field(
        None, description="Set in a one-module bundle made by `quorum compress`; optional, so older bundles read."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        ids = [m.id for m in self.modules]
        if ids != list(range(len(ids))):
            raise ValueError("modules must be listed by id 0..M-1")
        if sorted(self.anytime_order) != ids:
            raise ValueError("anytime_order must be a permutation of the module ids")
        if self.training.num_modules != len(ids):
            raise ValueError("training.num_modules disagrees with the module list")
        task = self.task.task
        if self.output.combiner != task.combiner:
            raise ValueError(f"a {task.kind} task combines its modules with {task.combiner!r}")
        scales = (self.output.target_scale, self.output.target_shift)
        if task.standardizes_targets and any(v is None or len(v) != self.num_classes for v in scales):
            raise ValueError("output.target_scale and target_shift need one entry per output")
        if self.confidence is not None and (not task.has_classes or self.confidence.stages[-1] != len(ids)):
            raise ValueError("confidence is for classifiers, with stages that end at the number of modules")
        if self.specialists and not task.has_classes:
            raise ValueError("specialist subsets answer one-vs-all class questions: classification only")
        if self.specialists:
            names = self.task.class_names
            if [s.class_index for s in self.specialists] != list(range(len(names))):
                raise ValueError("specialists must be listed one per class, by class index")
            for s in self.specialists:
                if s.class_name != names[s.class_index]:
                    raise ValueError(
                        f"specialist {s.class_index} is named {s.class_name!r}, the class {names[s.class_index]!r}"
                    )
                if len(set(s.modules)) != len(s.modules) or not set(s.modules) <= set(ids):
                    raise ValueError(f"specialist {s.class_index}: modules must be distinct module ids")
        return self

    @property
    def num_classes(self) -> int:
        """The width of every module's output: K classes, or D regression/count outputs."""
        return self.task.num_outputs

    def parity_bound(self, scale: float) -> float:
        """Largest |Δ logit| allowed between two graphs of this bundle that should agree, at logit scale
        `scale`: float rounding at FP32; the packed graph's float activations against the module
        graphs' quantized ones at reduced precision."""
        rtol = PARITY_RTOL if self.precision is None else max(PARITY_RTOL, self.precision.parity_rtol)
        return PARITY_ATOL + rtol * scale

    def dump(self, bundle_dir: Path) -> Path:
        """Write `bundle_dir/manifest.json` atomically: readers see the old or the new one, whole."""
        path = Path(bundle_dir) / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, bundle_dir: str | Path) -> Manifest:
        """Read and validate `bundle_dir/manifest.json`; BundleError says what is wrong."""
        path = Path(bundle_dir) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise BundleError(
                f"{bundle_dir} is not a bundle: no {MANIFEST_FILE}; create one with `quorum export`"
            ) from None
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{path} is not a {FORMAT} manifest")
        if data.get("version") not in READABLE_VERSIONS:
            raise BundleError(
                f"{path} has schema version {data.get('version')}; this Quorum reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
            shown = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in errors[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise BundleError(
                f"{path} does not match manifest schema version {SCHEMA_VERSION}: {shown}{more}; "
                "re-export the run with this Quorum's `quorum export`"
            ) from None


def probe_input(spec: InputSpec, n: int = 4, seed: int = 0) -> np.ndarray:
    """n fixed inputs drawn uniformly over the raw range, normalized as the manifest says.

    Module graphs are checked on them at load, and the packed graph against the module graphs.
    """
    lo, hi = spec.raw_range or (0.0, 1.0)
    raw = np.random.default_rng(seed).uniform(lo, hi, size=(n, *spec.shape)).astype(np.float32)
    channels = len(spec.mean)
    bshape = (1, channels) + (1,) * (len(spec.shape) - 1) if channels > 1 else (1,)
    mean = np.asarray(spec.mean, np.float32).reshape(bshape)
    std = np.asarray(spec.std, np.float32).reshape(bshape)
    x: np.ndarray = ((raw * np.float32(spec.scale) - mean) / std).astype(np.float32)
    return x
