"""Fashion-MNIST as raw numpy arrays, from the IDX files that Debian's `dataset-fashion-mnist` installs.

Only numpy and the standard library: the serving side and `quorum robustness` read the data on
devices where torch is not installed. The trainer's normalized tensors (`quorum.trainer.data`)
are built on top of this module.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from quorum.core.errors import DataError

__all__ = [
    "DATA_DIR_ENV",
    "DEBIAN_PACKAGE",
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "load_raw",
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
_FILE_NAMES = tuple(name for pair in _FILES.values() for name in pair)
_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


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
    """The predefined train and test splits as raw uint8 images (N, 784) and labels (N,): each call's
    own writable copies of arrays decoded once per process (the files' sizes and times key them)."""
    root = resolve_data_dir(data_dir)
    missing = [name for name in _FILE_NAMES if not (root / name).is_file()]
    if missing:
        raise DataError(_missing_message(root, missing))
    stats = [(name, (root / name).stat()) for name in _FILE_NAMES]
    stamp = tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    return {split: (x.copy(), y.copy()) for split, (x, y) in _decoded(root, stamp).items()}


@functools.lru_cache(maxsize=1)
def _decoded(root: Path, stamp: tuple[tuple[str, int, int], ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gunzipping the 30 MB of files takes about 0.6 s; `stamp` only keys the cache."""
    out = {}
    for split, (images_file, labels_file) in _FILES.items():
        images = read_idx(root / images_file)
        labels = read_idx(root / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{root}: {split} images {images.shape} do not match labels {labels.shape}")
        out[split] = (images.reshape(images.shape[0], -1), labels)
    return out
