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


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_raw_splits_are_decoded_once_but_each_call_gets_its_own_arrays_and_a_changed_file_is_read_again(
    tmp_path: Path,
):
    from quorum.core.datasets import load_raw

    images, labels = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28), np.arange(3, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    first = load_raw(tmp_path)
    first["train"][0][:] = 0  # a caller that writes into its arrays
    second = load_raw(tmp_path)
    np.testing.assert_array_equal(second["train"][0], images.reshape(3, -1))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])  # replaced by a smaller split
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2])
    np.testing.assert_array_equal(load_raw(tmp_path)["test"][1], labels[:2])


def test_cifar_without_its_files_says_where_to_put_them(tmp_path: Path):
    from quorum.trainer.data import load_cifar
    from quorum.trainer.errors import DataError

    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz .*" + str(tmp_path)):
        load_cifar("cifar10", tmp_path, download=False)


def test_augmentation_crops_and_mirrors_whole_batches_reproducibly():
    from quorum.trainer.data import augment

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    a = augment(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape
    torch.testing.assert_close(a, augment(x, torch.Generator().manual_seed(5)))  # the generator decides
    # Without padding the only freedom left is the mirror: each image is itself or mirrored.
    same = augment(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1))
    # Every value of a padded crop is a pixel of the image or a zero of the padding.
    assert set(a.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_augmentation_of_flat_images_shifts_them_and_returns_them_flat():
    from quorum.trainer.data import augment

    x = torch.arange(64 * 9, dtype=torch.float32).view(64, 9) + 1  # 64 flat 3x3 images, as an MLP takes them
    shifted = augment(x, torch.Generator().manual_seed(1), pad=1, flip=False, image_shape=(1, 3, 3))
    assert shifted.shape == x.shape
    images, out = x.view(64, 3, 3), shifted.view(64, 3, 3)
    moves = set()
    for i in range(64):  # each output is its image moved by (dy, dx) in {-1, 0, 1}^2, zeros shifted in
        padded = torch.nn.functional.pad(images[i], (1, 1, 1, 1))
        found = [
            (dy, dx) for dy in range(3) for dx in range(3) if torch.equal(padded[dy : dy + 3, dx : dx + 3], out[i])
        ]
        assert found, i
        moves.update(found)
    assert len(moves) > 4  # the shifts vary over the batch
    # Without padding and without the mirror nothing changes.
    assert torch.equal(augment(x, torch.Generator(), pad=0, flip=False, image_shape=(1, 3, 3)), x)


def test_tabular_datasets_have_fixed_test_rows_and_standardized_features():
    from quorum.trainer.data import load_dataset

    a, b = load_dataset("diabetes", seed=0), load_dataset("diabetes", seed=1)

    def raw(s, split):  # targets in their units: each seed standardizes with its own training rows
        return split.y * s.target_scale[0] + s.target_shift[0]

    torch.testing.assert_close(raw(a, a.test), raw(b, b.test))  # the test rows are fixed
    assert not torch.allclose(raw(a, a.val), raw(b, b.val))  # the validation rows follow the seed
    assert len(a.test) == 88 and a.image_shape == (10,) and a.task == "regression"
    assert abs(float(a.train.x.mean())) < 1e-5 and abs(float(a.train.y.mean())) < 1e-5
    counts = load_dataset("linnerud")
    assert counts.task == "count" and counts.train.y.min() >= 0 and counts.target_names == ("Chins", "Situps", "Jumps")
