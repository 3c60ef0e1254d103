"""Fashion-MNIST from the IDX files that Debian's `dataset-fashion-mnist` installs.

The data is small (70k images of 28x28 bytes), so every split is held in memory as one
tensor and batches are gathered by index: no DataLoader workers, nothing per sample.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quorum.trainer.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "Normalization",
    "Split",
    "Splits",
    "load_fashion_mnist",
    "read_idx",
    "resolve_data_dir",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "QUORUM_DATA_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


@dataclass(frozen=True)
class Normalization:
    """Preprocessing `x_model = (x_raw * scale - mean) / std`, per channel.

    `x_raw` is what a client sends: Fashion-MNIST pixel values in 0..255.
    """

    scale: float  # multiplies raw values, e.g. 1/255
    mean: tuple[float, ...]  # per channel, after scaling
    std: tuple[float, ...]  # per channel, after scaling

    def apply(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Normalize a (N, C*H*W) or (N, C, H, W) uint8/float tensor of raw values."""
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        if x_raw.dim() == 2:  # flat, one channel (MLP input)
            assert len(self.mean) == 1, "flat inputs carry one channel"
            return (x_raw.float() * self.scale - mean) / std
        shape = (1, -1, 1, 1)
        return (x_raw.float() * self.scale - mean.view(shape)) / std.view(shape)


@dataclass
class Split:
    """One split held in memory: normalized inputs and integer labels."""

    x: torch.Tensor  # (N, 784) float32, normalized
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    norm: Normalization
    class_names: tuple[str, ...]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the IDX files: the argument, else $QUORUM_DATA_DIR, else Debian's."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the MNIST container format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unsupported IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: expected {expected} bytes for shape {dims}, found {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).copy()  # writable, for torch


def _missing_message(data_dir: Path, missing: list[str]) -> str:
    return (
        f"Fashion-MNIST not found: {', '.join(missing)} missing in {data_dir}. "
        f"Install Debian's package with `apt-get update && apt-get install -y {DEBIAN_PACKAGE}` "
        f"(it puts the files in {DEFAULT_DATA_DIR}), or point --data-dir / ${DATA_DIR_ENV} "
        "at a folder holding the four IDX .gz files."
    )


def load_raw(data_dir: str | os.PathLike[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The predefined train and test splits as raw uint8 images (N, 784) and labels (N,)."""
    root = resolve_data_dir(data_dir)
    missing = [name for pair in _FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise DataError(_missing_message(root, missing))
    out = {}
    for split, (images_file, labels_file) in _FILES.items():
        images = read_idx(root / images_file)
        labels = read_idx(root / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{root}: {split} images {images.shape} do not match labels {labels.shape}")
        out[split] = (images.reshape(images.shape[0], -1), labels)
    return out


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
    if not 0 < val_size < len(y_all):
        raise ConfigError(f"val_size must lie in 1..{len(y_all) - 1}, got {val_size}")
    perm = np.random.default_rng(seed).permutation(len(y_all))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if subset is not None:
        if not 0 < subset <= len(train_idx):
            raise ConfigError(f"--subset must lie in 1..{len(train_idx)}, got {subset}")
        train_idx = train_idx[:subset]

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
