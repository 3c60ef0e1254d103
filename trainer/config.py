"""Training configuration: one dataclass, saved as `config.json` in the run directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from quorum.trainer.checkpoint import atomic_write_text
from quorum.trainer.errors import ConfigError, RunDirError
from quorum.trainer.loss import check_lambda
from quorum.trainer.models import list_archs

__all__ = ["RESUMABLE_OVERRIDES", "TrainConfig", "default_lr"]

# Options that may differ when a run is resumed: they change where or how long it runs,
# not what is being trained.
RESUMABLE_OVERRIDES = frozenset({"epochs", "device", "data_dir", "patience"})


def default_lr(num_modules: int, lam: float) -> float:
    """SGD learning rate for the MLP ensembles on Fashion-MNIST (momentum 0.9, batch 100): 0.02*M.

    By eq. (8) the gradient reaching each module's logits carries a factor 1/M, so the rate
    scales with M. The authors' runs cut it to a third for lambda >= 0.99; measured here
    (docs/RESULTS.md, "Default learning rate") that cut is worse after 10 epochs and no better
    after 40, at every lambda in {0.95, 0.99, 1}, so `lam` does not change the default.
    """
    del lam  # kept in the signature: the rate is a function of the configuration
    return 0.02 * num_modules


@dataclass
class TrainConfig:
    arch: str = "mlp"  # registered architecture name
    modules: int = 256  # M, modules in the ensemble
    hidden: int = 4  # H, hidden units per MLP module
    lam: float = 0.99  # modular-loss coefficient lambda in [0, 1]
    epochs: int = 10  # epochs to train (early stopping keeps the best one)
    lr: float | None = None  # SGD learning rate; None -> default_lr(modules, lam)
    momentum: float = 0.9  # SGD momentum, as in the papers
    batch_size: int = 100  # minibatch size, as in the papers
    seed: int = 0  # seeds the train/validation split, the subset, the init and the shuffles
    val_size: int = 10_000  # training images held out for validation
    subset: int | None = None  # train on only this many training images (smoke tests)
    patience: int | None = None  # stop after this many epochs without a better validation error
    dataset: str = "fashion-mnist"  # dataset name
    data_dir: str | None = None  # IDX folder; None -> $QUORUM_DATA_DIR, then Debian's path
    device: str = "auto"  # auto | cpu | cuda
    dominance_epoch: int = 3  # check for module dominance after this epoch (trainer/diagnostics.py); 0 = off
    command: str = ""  # the command line that started the run, for the manifest

    def __post_init__(self) -> None:
        check_lambda(self.lam)
        if self.arch not in list_archs():
            raise ConfigError(f"unknown --arch {self.arch!r}; choose one of {', '.join(list_archs())}")
        for name in ("modules", "hidden", "epochs", "batch_size"):
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
        if self.dataset != "fashion-mnist":
            raise ConfigError(f"unknown --dataset {self.dataset!r}; available: fashion-mnist")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.modules, self.lam)

    @property
    def name(self) -> str:
        """The papers' naming, e.g. 256-M-4-H."""
        return f"{self.modules}-M-{self.hidden}-H"

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
        conflicts = [
            f"--{k.replace('_', '-')} {v} (run has {getattr(self, k)})"
            for k, v in overrides.items()
            if k not in RESUMABLE_OVERRIDES and k != "command" and v != getattr(self, k)
        ]
        if conflicts:
            raise RunDirError(
                "a resumed run keeps its training options; these differ from config.json: "
                + ", ".join(conflicts)
                + ". Drop them, or start a new run with another --out."
            )
        allowed = {k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES}
        return replace(self, **allowed)
