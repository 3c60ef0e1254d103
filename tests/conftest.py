"""Shared fixtures: one small ensemble trained on real Fashion-MNIST and exported once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.trainer.data import load_raw, resolve_data_dir

SMALL = dict(arch="mlp", modules=40, hidden=4, lam=0.99, epochs=1, subset=3000, seed=0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = resolve_data_dir()
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST is missing in {root}: run `make test` (it installs dataset-fashion-mnist)")
    return root


@pytest.fixture(scope="session")
def test_images(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw test images (N, 784) uint8 and labels (N,)."""
    return load_raw(data_dir)["test"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    from quorum.trainer.config import TrainConfig
    from quorum.trainer.train import train

    out = tmp_path_factory.mktemp("runs") / "small"
    train(TrainConfig(**SMALL, command="pytest"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, run_dir: Path) -> Path:
    from quorum.exporter.export import export_run

    out = tmp_path_factory.mktemp("bundles") / "small"
    export_run(run_dir, out, progress=False)
    return out


@pytest.fixture
def bundle_copy(tmp_path: Path, bundle_dir: Path) -> Path:
    """A private copy of the bundle that a test may damage."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst
