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


# ---------------------------------------------------------------- regression and count bundles
# Built here, not by the trainer: five linear modules, each fitted on a bootstrap resample of a
# dataset scikit-learn ships, written as real ONNX graphs with onnx.helper.


def _linear_graph(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """input (N, F) -> MatMul (F, D) -> Add (D,) -> logits (N, D), dynamic batch axis."""
    from onnx import TensorProto, helper, numpy_helper

    f, d = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "linear_module",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", f])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", d])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def write_tabular_bundle(out: Path, dataset: str, modules: int = 5, seed: int = 0) -> Path:
    """A regression ("diabetes": 10 features -> progression, Gaussian) or count ("linnerud":
    weight, waist, pulse -> chins, situps, jumps, Poisson) bundle of linear modules in `out`."""
    import datetime as dt
    import hashlib

    from sklearn import datasets
    from sklearn.linear_model import PoissonRegressor

    from quorum.runtime.manifest import (
        EnsembleMetrics,
        InputSpec,
        Manifest,
        ModuleEntry,
        OutputSpec,
        TaskSpec,
        TrainingInfo,
    )

    if dataset == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
        x_raw, y = bunch.data, bunch.target.reshape(-1, 1)
        task = TaskSpec(kind="regression", target_names=["progression"])
        output = OutputSpec(name="logits", combiner="mean", target_scale=[77.0], target_shift=[152.0])
    else:
        bunch = datasets.load_linnerud()
        x_raw, y = bunch.target, bunch.data  # body measures -> exercise counts
        task = TaskSpec(kind="count", target_names=list(bunch.feature_names))
        output = OutputSpec(name="logits", combiner="mean_exp")
    mean, std = x_raw.mean(axis=0), x_raw.std(axis=0)
    x = (x_raw - mean) / std  # (R, F), as the runtime normalizes
    rng = np.random.default_rng(seed)
    (out / "modules").mkdir(parents=True)
    entries = []
    for j in range(modules):
        rows = rng.choice(len(x), len(x))  # a bootstrap resample
        if task.kind == "regression":
            z = np.c_[x[rows], np.ones(len(rows))]
            coef = np.linalg.lstsq(z, (y[rows] - 152.0) / 77.0, rcond=None)[0]  # (F + 1, 1)
            weights, bias = coef[:-1], coef[-1]
        else:
            fits = [PoissonRegressor(alpha=0.1, max_iter=1000).fit(x[rows], y[rows, d]) for d in range(y.shape[1])]
            weights = np.stack([f.coef_ for f in fits], axis=1)  # (F, D)
            bias = np.array([f.intercept_ for f in fits])
        graph = _linear_graph(weights, bias)
        file = f"modules/m{j:03d}.onnx"
        (out / file).write_bytes(graph)
        entries.append(
            ModuleEntry(
                id=j,
                file=file,
                sha256=hashlib.sha256(graph).hexdigest(),
                params=weights.size + bias.size,
                flops=2 * weights.size,
                val_error=0.0,  # not measured by this fixture
                parity=0.0,
            )
        )
    Manifest(
        name=f"{dataset}-linear",
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        task=task,
        input=InputSpec(
            name="input", shape=[x.shape[1]], scale=1.0, mean=mean.tolist(), std=std.tolist(), raw_range=None
        ),
        output=output,
        training=TrainingInfo(
            arch="linear",
            num_modules=modules,
            lam=1.0,
            dataset=dataset,
            seed=seed,
            epochs=0,
            best_epoch=0,
            lr=0.0,
            batch_size=len(x),
            command="pytest: linear fits on bootstrap resamples",
        ),
        modules=entries,
        anytime_order=list(range(modules)),
        anytime_criterion="module id",
        metrics=EnsembleMetrics(val_error=0.0, test_error=0.0, val_nll=0.0, test_nll=0.0),
    ).dump(out)
    return out


@pytest.fixture(scope="session")
def regression_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 linear modules on diabetes: input (N, 10) raw features -> progression (Gaussian)."""
    return write_tabular_bundle(tmp_path_factory.mktemp("bundles") / "diabetes", "diabetes")


@pytest.fixture(scope="session")
def count_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 Poisson GLMs on linnerud: input (N, 3) body measures -> chins, situps, jumps (counts)."""
    return write_tabular_bundle(tmp_path_factory.mktemp("bundles") / "linnerud", "linnerud")
