"""Fashion-MNIST as normalized torch tensors, with a seeded validation hold-out.

The data is small (70k images of 28x28 bytes), so every split is held in memory as one
tensor and batches are gathered by index: no DataLoader workers, nothing per sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

# The raw, torch-free reading lives in quorum.datasets; its names stay importable from here.
from quorum.datasets import (
    DATA_DIR_ENV,
    DEBIAN_PACKAGE,
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    load_raw,
    read_idx,
    resolve_data_dir,
)
from quorum.trainer.errors import ConfigError

__all__ = [
    "DATA_DIR_ENV",
    "DEBIAN_PACKAGE",
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "Normalization",
    "Split",
    "Splits",
    "load_fashion_mnist",
    "load_raw",
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
