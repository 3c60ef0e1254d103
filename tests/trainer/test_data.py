from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from quorum.trainer.data import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from quorum.trainer.errors import DataError


def test_real_fashion_mnist_splits(data_dir: Path):
    d = load_fashion_mnist(data_dir, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (50_000, 10_000, 10_000)
    assert d.train.x.shape == (50_000, 784) and d.train.x.dtype == torch.float32
    assert set(d.test.y.unique().tolist()) == set(range(10))
    assert d.class_names == FASHION_MNIST_CLASSES
    # normalized with statistics of the training split
    assert abs(float(d.train.x.mean())) < 1e-3 and abs(float(d.train.x.std()) - 1) < 1e-3
    assert d.norm.scale == pytest.approx(1 / 255)


def test_validation_split_is_seeded_and_disjoint(data_dir: Path):
    a = load_fashion_mnist(data_dir, seed=3, subset=500)
    b = load_fashion_mnist(data_dir, seed=3, subset=500)
    c = load_fashion_mnist(data_dir, seed=4, subset=500)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    train_rows = {row.tobytes() for row in a.train.x.numpy()}
    assert not any(row.tobytes() in train_rows for row in a.val.x.numpy()[:2000])
    assert len(a.train) == 500


def test_missing_files_name_the_debian_package_and_the_override(tmp_path: Path):
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg and "--data-dir" in msg and "QUORUM_DATA_DIR" in msg


def test_environment_variable_overrides_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QUORUM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        load_fashion_mnist()


def test_truncated_idx_file_is_reported(tmp_path: Path):
    path = tmp_path / "bad.gz"
    header = bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big")
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(10))
    with pytest.raises(DataError, match="expected 108 bytes"):
        read_idx(path)


def test_idx_reader_round_trip(tmp_path: Path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)
