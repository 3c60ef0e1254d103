"""Fashion-MNIST and CIFAR-10/100 as normalized torch tensors, with a seeded validation hold-out.

The data is small (70k images of 28x28 bytes; 60k of 32x32x3), so every split is held in
memory as one tensor and batches are gathered by index: no DataLoader workers, nothing per
sample. The flip-and-crop augmentation (`augment`) runs on whole batches, on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The raw, torch-free reading lives in quorum.core.datasets; its names stay importable from here.
from quorum.core.datasets import (
    DATA_DIR_ENV,
    DEBIAN_PACKAGE,
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    load_raw,
    read_idx,
    resolve_data_dir,
)
from quorum.core.tasks import get_task
from quorum.trainer.errors import ConfigError, DataError

__all__ = [
    "DATA_DIR_ENV",
    "DEBIAN_PACKAGE",
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "Normalization",
    "Split",
    "Splits",
    "augment",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_raw",
    "load_tabular",
    "read_idx",
    "resolve_data_dir",
]


@dataclass(frozen=True)
class Normalization:
    """Preprocessing `x_model = (x_raw * scale - mean) / std`, per channel.

    `x_raw` is what a client sends: Fashion-MNIST pixel values in 0..255.
    """

    scale: float  # multiplies raw values, e.g. 1/255
    mean: tuple[float, ...]  # per channel, after scaling
    std: tuple[float, ...]  # per channel, after scaling

    def apply(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Normalize a (N, C*H*W) or (N, C, H, W) uint8/float tensor of raw values, or (N, F)
        features with one mean and std each."""
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        if x_raw.dim() == 2:  # flat: one channel (MLP input), or F features
            assert len(self.mean) in (1, x_raw.shape[1]), "flat inputs carry one channel, or one per feature"
            return (x_raw.float() * self.scale - mean) / std
        shape = (1, -1, 1, 1)
        return (x_raw.float() * self.scale - mean.view(shape)) / std.view(shape)


@dataclass
class Split:
    """One split held in memory: normalized inputs and integer labels."""

    x: torch.Tensor  # (N, 784) for Fashion-MNIST, (N, 3, 32, 32) for CIFAR: float32, normalized
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    norm: Normalization
    class_names: tuple[str, ...]  # classification; empty for regression and count tasks
    image_shape: tuple[int, ...] = (1, 28, 28)  # (C, H, W) of one input; (F,) for tabular data
    task: str = "classification"  # the targets' task kind (quorum.core.tasks): classification | regression | count
    target_names: tuple[str, ...] = ()  # regression, count: the D outputs
    target_shift: tuple[float, ...] = ()  # regression: y was standardized as (y - shift) / scale
    target_scale: tuple[float, ...] = ()

    @property
    def num_outputs(self) -> int:
        return len(self.class_names) or len(self.target_names)

    def input_shape(self, image_input: bool) -> tuple[int, ...]:
        """What a model sees: the image, or (for an MLP on one-channel data) the flat vector, as
        bundles of MLPs on Fashion-MNIST have always taken."""
        if len(self.image_shape) == 1:
            if image_input:
                raise ConfigError(
                    f"{self.task} data are feature vectors; convolutional modules need images: --arch mlp"
                )
            return self.image_shape
        if image_input or self.image_shape[0] > 1:
            return self.image_shape
        return (int(np.prod(self.image_shape)),)


def _first(train_idx: np.ndarray, subset: int | None) -> np.ndarray:
    """The first `subset` training rows (all with None)."""
    if subset is None:
        return train_idx
    if not 0 < subset <= len(train_idx):
        raise ConfigError(f"--subset must lie in 1..{len(train_idx)}, got {subset}")
    return train_idx[:subset]


def _holdout(n: int, val_size: int, subset: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation and training row indices of n rows: `val_size` held out at random by `seed`."""
    if not 0 < val_size < n:
        raise ConfigError(f"val_size must lie in 1..{n - 1}, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:val_size], _first(perm[val_size:], subset)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 10_000,
    subset: int | None = None,
    seed: int = 0,
) -> Splits:
    """Load Fashion-MNIST with a seeded hold-out of `val_size` training images for validation.

    Normalization statistics are computed on the training images that remain, as the
    paper's "mean and standard deviation normalization".

    Args:
        data_dir: folder of the four IDX .gz files (default: $QUORUM_DATA_DIR, then Debian's).
        val_size: training images held out for early stopping and selection.
        subset: train on only this many of the remaining training images (smoke tests).
        seed: seeds the train/validation split and the subset.
    """
    raw = load_raw(data_dir)
    x_all, y_all = raw["train"]
    val_idx, train_idx = _holdout(len(y_all), val_size, subset, seed)

    x_train = torch.from_numpy(x_all[train_idx].astype(np.float32) / 255.0)
    norm = Normalization(
        scale=1.0 / 255.0,
        mean=(float(x_train.mean()),),
        std=(float(x_train.std()),),
    )

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(norm.apply(torch.from_numpy(x)), torch.from_numpy(y.astype(np.int64)))

    x_test, y_test = raw["test"]
    return Splits(
        train=split(x_all[train_idx], y_all[train_idx]),
        val=split(x_all[val_idx], y_all[val_idx]),
        test=split(x_test, y_test),
        norm=norm,
        class_names=FASHION_MNIST_CLASSES,
    )


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def load_cifar(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 10_000,
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Splits:
    """CIFAR-10 or CIFAR-100 through torchvision, with a seeded validation hold-out and
    per-channel normalization from the remaining training images.

    Looks in `data_dir` (default: $QUORUM_DATA_DIR/cifar, else ~/.cache/quorum/cifar) and
    downloads there when the internet is reachable; otherwise DataError says where to put
    the archive.
    """
    from torchvision import datasets  # only CIFAR needs torchvision

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    default = Path(os.environ[DATA_DIR_ENV]) / "cifar" if os.environ.get(DATA_DIR_ENV) else None
    root = Path(data_dir) if data_dir else default or Path.home() / ".cache" / "quorum" / "cifar"
    try:
        train_set, test_set = (cls(str(root), train=t, download=download) for t in (True, False))
    except Exception as e:  # torchvision raises RuntimeError when absent, URLError/OSError offline
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        raise DataError(
            f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: {e}). Put {archive} "
            f"(from {CIFAR_URL}) or its extracted folder in {root}, or pass --data-dir."
        ) from None
    x_all, y_all = train_set.data, np.asarray(train_set.targets)  # (N, 32, 32, 3) uint8
    val_idx, train_idx = _holdout(len(y_all), val_size, subset, seed)
    chw = np.ascontiguousarray(x_all.transpose(0, 3, 1, 2))  # (N, 3, 32, 32)
    scaled = chw[train_idx].astype(np.float32) / 255.0
    norm = Normalization(
        scale=1.0 / 255.0,
        mean=tuple(float(v) for v in scaled.mean(axis=(0, 2, 3))),
        std=tuple(float(v) for v in scaled.std(axis=(0, 2, 3))),
    )

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(norm.apply(torch.from_numpy(x)), torch.from_numpy(np.asarray(y, dtype=np.int64)))

    x_test = np.ascontiguousarray(test_set.data.transpose(0, 3, 1, 2))
    return Splits(
        train=split(chw[train_idx], y_all[train_idx]),
        val=split(chw[val_idx], y_all[val_idx]),
        test=split(x_test, np.asarray(test_set.targets)),
        norm=norm,
        class_names=tuple(train_set.classes),
        image_shape=(3, 32, 32),
    )


TABULAR = ("diabetes", "linnerud")
TEST_FRACTION = 0.2  # of the rows of a tabular dataset, fixed whatever the seed
TEST_SEED = 20_260_101


def load_tabular(name: str, *, val_size: int = 10_000, subset: int | None = None, seed: int = 0) -> Splits:
    """A tabular dataset that scikit-learn ships (nothing is downloaded):

    - diabetes: 442 patients, 10 features, one regression target (disease progression after a
      year); Gaussian targets, standardized for training (the manifest undoes it).
    - linnerud: 20 men, 3 physiological measures (weight, waist, pulse) -> 3 exercise counts
      (chins, situps, jumps); Poisson targets. Tiny: a demonstration of count targets.

    A fixed 20 % of the rows is the test split; of the rest, `val_size` rows (at most 20 %) are
    held out for validation, seeded by `seed`. Features are standardized with the training rows.
    """
    from sklearn import datasets  # the train extra installs it; only these datasets need it

    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
        x, y = bunch.data, bunch.target.reshape(-1, 1)
        task, features, targets = "regression", tuple(bunch.feature_names), ("progression",)
    elif name == "linnerud":
        bunch = datasets.load_linnerud()
        x, y = bunch.target, bunch.data  # predict the exercise counts from the body measures
        task, features, targets = "count", tuple(bunch.target_names), tuple(bunch.feature_names)
    else:
        raise ConfigError(f"unknown tabular dataset {name!r}; choose one of {', '.join(TABULAR)}")
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    order = np.random.default_rng(TEST_SEED).permutation(len(y))
    n_test = max(1, round(TEST_FRACTION * len(y)))
    test_idx, rest = order[:n_test], order[n_test:]
    rest = rest[np.random.default_rng(seed).permutation(len(rest))]
    n_val = max(1, min(val_size, round(0.2 * len(rest))))
    val_idx, train_idx = rest[:n_val], _first(rest[n_val:], subset)
    std = x[train_idx].std(axis=0)
    norm = Normalization(
        scale=1.0,
        mean=tuple(float(v) for v in x[train_idx].mean(axis=0)),
        std=tuple(float(v) if v > 0 else 1.0 for v in std),
    )
    standardize = get_task(task).standardizes_targets
    shift = tuple(float(v) for v in y[train_idx].mean(axis=0)) if standardize else ()
    scale = tuple(float(v) for v in y[train_idx].std(axis=0)) if standardize else ()

    def split(idx: np.ndarray) -> Split:
        target = (y[idx] - np.array(shift, np.float32)) / np.array(scale, np.float32) if shift else y[idx]
        return Split(norm.apply(torch.from_numpy(x[idx])), torch.from_numpy(np.ascontiguousarray(target)))

    del features  # the manifest's input carries no names
    return Splits(
        train=split(train_idx),
        val=split(val_idx),
        test=split(test_idx),
        norm=norm,
        class_names=(),
        image_shape=(x.shape[1],),
        task=task,
        target_names=targets,
        target_shift=shift,
        target_scale=scale,
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int = 10_000,
    subset: int | None = None,
    seed: int = 0,
) -> Splits:
    """The dataset called `name` (fashion-mnist, cifar10, cifar100, diabetes, linnerud) with a seeded
    validation hold-out."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, val_size=val_size, subset=subset, seed=seed)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, val_size=val_size, subset=subset, seed=seed)
    if name in TABULAR:
        return load_tabular(name, val_size=val_size, subset=subset, seed=seed)
    raise ConfigError(f"unknown dataset {name!r}; choose one of fashion-mnist, cifar10, cifar100, {', '.join(TABULAR)}")


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    pad: int = 4,
    flip: bool = True,
    image_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Flip-and-crop augmentation of a batch (B, C, H, W), on its device: a random crop of the
    image zero-padded by `pad` on every side (a shift of up to `pad` pixels), mirrored left-right
    with probability 1/2 where `flip`. With `image_shape` (C, H, W), `x` holds the images flat,
    as an MLP takes them, and comes back flat.

    Drawn from `generator` (on the CPU), so a resumed run sees the same augmentations."""
    flat_shape = x.shape
    if image_shape is not None:
        x = x.reshape(len(x), *image_shape)
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=generator).to(x.device)
    rows = dy.view(B, 1) + torch.arange(H, device=x.device)  # (B, H): the crop's rows
    cols = dx.view(B, 1) + torch.arange(W, device=x.device)
    if flip:
        mirrored = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        cols = torch.where(mirrored.view(B, 1), cols.flip(1), cols)  # the crop's columns, reversed: mirrored
    out = padded.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W + 2 * pad))
    out = out.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))
    return out.reshape(flat_shape)
