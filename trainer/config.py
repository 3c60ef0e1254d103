"""Training configuration: one dataclass, saved as `config.json` in the run directory."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from quorum.core.tasks import Task, get_task
from quorum.trainer.checkpoint import atomic_write_text
from quorum.trainer.errors import ConfigError, RunDirError
from quorum.trainer.loss import LOSSES, check_lambda
from quorum.trainer.models import arch_info, list_archs
from quorum.trainer.models.mlp import mlp_widths
from quorum.trainer.prefix import PREFIX_LOSSES, PREFIX_WEIGHTS
from quorum.trainer.schedule import SCHEDULES

__all__ = ["RESUMABLE_OVERRIDES", "TrainConfig", "default_lr"]

# Options that may differ when a run is resumed: they change where or how long it runs,
# not what is being trained.
RESUMABLE_OVERRIDES = frozenset({"epochs", "device", "data_dir", "patience", "log_every"})

# The task of each dataset's targets, which fixes the modular loss's exponential family (joint-training paper, Table 1).
DATASET_TASKS = {
    "fashion-mnist": "classification",
    "cifar10": "classification",
    "cifar100": "classification",
    "diabetes": "regression",
    "linnerud": "count",
}
DATASETS = tuple(DATASET_TASKS)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_lr(num_modules: int, arch: str = "mlp", task: Task | None = None) -> float:
    """SGD learning rate (momentum 0.9): a rate per module times M.

    By eq. (8) the gradient reaching each module's logits carries a factor 1/M, so the rate
    scales with M: 0.1*M trains each convolutional module as the papers' rate of 0.1 trains one
    network alone; the MLPs take 0.02*M (the architecture's `lr_per_module`). A task may set its
    own (counts: 0.0002*M, their gradient carries the predicted counts). λ does not change it
    (docs/RESULTS.md, "Default learning rate").
    """
    per_module = task.lr_per_module if task is not None and task.lr_per_module is not None else None
    return (per_module if per_module is not None else arch_info(arch).lr_per_module) * num_modules


@dataclass
class TrainConfig:
    arch: str = "mlp"  # registered architecture name
    modules: int = 256  # M, modules in the ensemble
    hidden: int | str = 4  # mlp: H, hidden units per module, or one width per hidden layer ("64,64")
    filters: str = "cifar10"  # convnet, treenet: channels of each 3x3 layer ("32,64,64") or a preset
    strides: str | None = None  # convnet, treenet: stride of each layer ("1,2,1"); None: the preset's, or 1
    padding: int | None = None  # convnet, treenet: padding of every layer; None: the preset's, or 1
    split: int = 0  # treenet: layers in the shared trunk; 0: about the first half
    depth: int = 100  # densenet_bc: depth, 6n + 4
    growth: int = 12  # densenet_bc: growth rate k
    loss: str = "modular"  # modular | mcl (Lee et al. §6.2) | prefix | dropout (trainer/prefix.py): loss.LOSSES
    prefix_weights: str = "uniform"  # prefix, dropout: w_b over the prefix lengths 1, 2, 4, …, M: uniform | small
    prefix_scale: float = 1.0  # prefix, dropout: μ, the prefix term's weight against L_λ
    mcl_k: int = 1  # mcl: each example trains its k best modules
    pretrain_epochs: int = 0  # mcl: epochs of independent cross-entropy first
    weight_decay: float = 0.0  # as for one module trained alone at lr / M (applied as weight_decay / M)
    lam: float = 0.99  # modular-loss coefficient lambda in [0, 1]
    epochs: int = 10  # epochs to train (early stopping keeps the best one)
    lr: float | None = None  # SGD learning rate; None -> default_lr(modules, arch, task)
    momentum: float = 0.9  # SGD momentum, as in the papers
    schedule: str = "constant"  # learning-rate schedule, per step: constant | cosine (trainer/schedule.py)
    warmup_epochs: float = 1.0  # cosine: epochs of linear warmup to --lr
    batch_size: int = 100  # minibatch size, as in the papers
    seed: int = 0  # seeds the train/validation split, the subset, the init and the shuffles
    val_size: int = 10_000  # training images held out for validation
    subset: int | None = None  # train on only this many training images (smoke tests)
    patience: int | None = None  # stop after this many epochs without a better validation error
    dataset: str = "fashion-mnist"  # dataset name
    data_dir: str | None = None  # IDX folder; None -> $QUORUM_DATA_DIR, then Debian's path
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 autocast (auto: bf16 on CUDA where supported, fp32 on the CPU)
    augment: bool | None = None  # random crop (padding --augment-pad) and horizontal flip; None: on for CIFAR
    augment_pad: int = 4  # --augment: zero padding of the crop, so the largest shift, in pixels
    augment_flip: bool = True  # --augment: mirror half the images left-right
    log_every: int = 50  # steps between progress updates (the only host syncs of a CUDA epoch)
    dominance_epoch: int = 3  # check for module dominance after this epoch (trainer/diagnostics.py); 0 = off
    command: str = ""  # the command line that started the run, for the manifest

    def __post_init__(self) -> None:
        check_lambda(self.lam)
        if self.arch not in list_archs():
            raise ConfigError(f"unknown --arch {self.arch!r}; choose one of {', '.join(list_archs())}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.loss == "mcl" and not 1 <= self.mcl_k <= self.modules:
            raise ConfigError(f"--mcl-k must lie in 1..M={self.modules}, got {self.mcl_k}")
        if self.pretrain_epochs < 0 or (self.pretrain_epochs and self.loss != "mcl"):
            raise ConfigError("--pretrain-epochs (>= 0) applies to --loss mcl only")
        if self.loss not in PREFIX_LOSSES and (self.prefix_weights != "uniform" or self.prefix_scale != 1.0):
            raise ConfigError("--prefix-weights and --prefix-scale apply to --loss prefix or dropout only")
        if self.prefix_weights not in PREFIX_WEIGHTS:
            known = ", ".join(PREFIX_WEIGHTS)
            raise ConfigError(f"--prefix-weights must be one of {known}, got {self.prefix_weights!r}")
        if not (math.isfinite(self.prefix_scale) and self.prefix_scale >= 0):
            raise ConfigError(f"--prefix-scale must be a finite number >= 0, got {self.prefix_scale}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise ConfigError(f"--warmup-epochs must lie in [0, --epochs = {self.epochs}], got {self.warmup_epochs}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.augment_pad < 0:
            raise ConfigError(f"--augment-pad must be >= 0, got {self.augment_pad}")
        if self.use_augment and self.augment_pad == 0 and not self.augment_flip:
            raise ConfigError("--augment with --augment-pad 0 and --no-augment-flip changes no image; use --no-augment")
        widths = mlp_widths(self.hidden)  # ConfigError unless 1 to 4 widths >= 1
        self.hidden = widths[0] if len(widths) == 1 else ",".join(map(str, widths))  # 4 stays an int, as ever
        for name in ("modules", "epochs", "batch_size", "depth", "growth", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must lie in [0, 1), got {self.momentum}")
        if self.dominance_epoch < 0:
            raise ConfigError(f"--dominance-epoch must be >= 0 (0 turns the check off), got {self.dominance_epoch}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"--patience must be >= 1, got {self.patience}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown --dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if not self.task.has_classes and (arch_info(self.arch).image_input or self.loss == "mcl"):
            raise ConfigError(
                f"--dataset {self.dataset} has {self.task.family} targets ({self.task.kind}): train it on flat "
                "features (--arch mlp) with the modular loss (or a prefix-aware one)"
            )

    @property
    def task(self) -> Task:
        """What the dataset's targets are: classes, real values (Gaussian) or counts (Poisson)."""
        return get_task(DATASET_TASKS[self.dataset])

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.modules, self.arch, self.task)

    @property
    def name(self) -> str:
        """The papers' naming, e.g. 256-M-4-H, DN-64-6-16, 16-M-convnet-16.32.32-s2.2.1."""
        return arch_info(self.arch).label(self.modules, self.arch_params())

    def arch_params(self) -> dict[str, int | str]:
        """The options of this run's architecture that are set, as `create` takes them and the manifest records them."""
        return {k: getattr(self, k) for k in arch_info(self.arch).options if getattr(self, k) is not None}

    @property
    def use_augment(self) -> bool:
        return self.augment if self.augment is not None else self.dataset.startswith("cifar")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        atomic_write_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise RunDirError(f"cannot read {path}: {e}") from e

    def resumed_with(self, overrides: dict[str, Any]) -> TrainConfig:
        """This (stored) config with the options a resumed run may change; refuse the rest."""
        fixed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and k != "command"}
        asked = replace(self, **fixed)  # the options as a config holds them (e.g. --hidden "4" as 4)
        conflicts = [
            f"--{k.replace('_', '-')} {v} (run has {getattr(self, k)})"
            for k, v in fixed.items()
            if getattr(asked, k) != getattr(self, k)
        ]
        if self.schedule != "constant" and overrides.get("epochs", self.epochs) != self.epochs:
            ends = f"run has {self.epochs}: its {self.schedule} schedule ends there"
            conflicts.append(f"--epochs {overrides['epochs']} ({ends})")
        if conflicts:
            raise RunDirError(
                "a resumed run keeps its training options; these differ from config.json: "
                + ", ".join(conflicts)
                + ". Drop them, or start a new run with another --out."
            )
        allowed = {k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES}
        return replace(self, **allowed)
