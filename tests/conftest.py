"""Shared fixtures.

Fast (no torch, no training): real Fashion-MNIST, and bundles built directly as ONNX graphs
(`tests/bundles.py`): a 40-module classifier (`bundle_dir`), regression and count bundles.
Slow (marked `slow`, run by `make test`): a small ensemble trained and exported once per
session (`run_dir`, `exported_bundle`), and one trained bundle per convolutional architecture
(`arch_bundle`), shared by the tests that need them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quorum.core.datasets import load_raw, resolve_data_dir
from tests.bundles import CONV_SIZES, write_mlp_bundle, write_tabular_bundle

SMALL = dict(arch="mlp", modules=40, hidden=4, lam=0.99, epochs=1, subset=3000, seed=0)


# Fixtures that train: a test that uses one is in the slow tier.
TRAINED_FIXTURES = frozenset({"run_dir", "exported_bundle", "arch_bundle", "tiny_run", "sweep"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """40 MLP modules 784-4-10 on Fashion-MNIST, with the packed graph and specialists; built, not trained."""
    return write_mlp_bundle(tmp_path_factory.mktemp("bundles") / "small", data_dir)


@pytest.fixture
def bundle_copy(tmp_path: Path, bundle_dir: Path) -> Path:
    """A private copy of the bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


@pytest.fixture(scope="session")
def regression_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 linear modules on diabetes: input (N, 10) raw features -> progression (Gaussian)."""
    return write_tabular_bundle(tmp_path_factory.mktemp("bundles") / "diabetes", "diabetes")


@pytest.fixture(scope="session")
def count_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 Poisson GLMs on linnerud: input (N, 3) body measures -> chins, situps, jumps (counts)."""
    return write_tabular_bundle(tmp_path_factory.mktemp("bundles") / "linnerud", "linnerud")


# ---------------------------------------------------------------- trained (slow)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 40-module 784-4-10 ensemble at λ = 0.99, one epoch on 3,000 Fashion-MNIST images."""
    from quorum.trainer.config import TrainConfig
    from quorum.trainer.train import train

    out = tmp_path_factory.mktemp("runs") / "small"
    train(TrainConfig(**SMALL, command="pytest"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory, run_dir: Path) -> Path:
    """`run_dir` exported by `quorum export`."""
    from quorum.exporter.export import export_run

    out = tmp_path_factory.mktemp("bundles") / "exported"
    export_run(run_dir, out, progress=False)
    return out


@pytest.fixture(scope="session")
def arch_bundle(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Callable[[str], tuple[Path, Path]]:
    """(run, bundle) of a tiny ensemble of 3 modules of a convolutional architecture, trained for one
    epoch on 1,000 images and exported by the real CLI; each architecture once per session."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            tmp = tmp_path_factory.mktemp(arch)
            run, bundle = tmp / "run", tmp / "bundle"
            for args in (
                ["train", "--arch", arch, "--modules", "3", *CONV_SIZES[arch], "--lam", "0.95", "--epochs", "1",
                 "--subset", "1000", "--out", str(run), "--quiet"],
                ["export", str(run), "--out", str(bundle), "--quiet"],
            ):  # fmt: skip
                cmd = [sys.executable, "-m", "quorum", *args]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                assert out.returncode == 0, out.stderr[-3000:]
            made[arch] = (run, bundle)
        return made[arch]

    return get
