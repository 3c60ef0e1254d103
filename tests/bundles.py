"""Bundles built for the tests without training: real ONNX graphs on real data, no torch.

- `write_mlp_bundle`: a Fashion-MNIST classifier of M modules 784-H-10 (Gemm, Relu, Gemm, as
  the exporter writes MLP modules), each a random ReLU feature map whose output layer is fitted
  by ridge regression on a bootstrap resample of training images; with the packed graph, an
  anytime order, specialist subsets and metrics measured on held-out images.
- `write_tabular_bundle`: a regression (diabetes, Gaussian) or count (linnerud, Poisson) bundle
  of linear modules fitted on bootstrap resamples of datasets scikit-learn ships.

The runtime, server and experiment tests run on these, so they need neither torch nor a
training run; the exporter's own tests export trained runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quorum.core.datasets import FASHION_MNIST_CLASSES, load_raw
from quorum.core.tasks import softmax
from quorum.runtime.manifest import (
    EnsembleMetrics,
    InputSpec,
    Manifest,
    ModuleEntry,
    OutputSpec,
    SpecialistEntry,
    TaskSpec,
    TrainingInfo,
)

__all__ = [
    "CONV_SIZES",
    "flip_bytes",
    "hang_on_zero_pixels",
    "nan_on_zero_pixels",
    "rewrite_module",
    "write_mlp_bundle",
    "write_tabular_bundle",
]

IR_VERSION = 9  # onnx.helper stamps a newer IR version than ONNX Runtime reads
# Tiny sizes of each convolutional architecture, as `quorum train` options, for the trained test bundles.
CONV_SIZES = {
    "convnet": ["--filters", "6,8", "--strides", "2,2"],
    "treenet": ["--filters", "6,8,8", "--strides", "2,2,1", "--split", "1"],
    "densenet_bc": ["--depth", "10", "--growth", "4"],
}


def _model(nodes: list, inputs: list, output: object, initializers: list, name: str) -> bytes:
    from quorum.exporter.graphs import OPSET

    graph = helper.make_graph(nodes, name, inputs, [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return model.SerializeToString()


def _mlp_graph(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> bytes:
    """input (N, D) -> Gemm (H, D)ᵀ -> Relu -> Gemm (K, H)ᵀ -> logits (N, K): an exported MLP module's ops."""
    d, k = w1.shape[1], w2.shape[0]
    return _model(
        [
            helper.make_node("Gemm", ["input", "W1", "B1"], ["pre"], transB=1),
            helper.make_node("Relu", ["pre"], ["hidden"]),
            helper.make_node("Gemm", ["hidden", "W2", "B2"], ["logits"], transB=1),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", d])],
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k]),
        [
            numpy_helper.from_array(w1.astype(np.float32), "W1"),
            numpy_helper.from_array(b1.astype(np.float32), "B1"),
            numpy_helper.from_array(w2.astype(np.float32), "W2"),
            numpy_helper.from_array(b2.astype(np.float32), "B2"),
        ],
        "mlp_module",
    )


def _f1(pred: np.ndarray, y: np.ndarray, c: int) -> float:
    tp = float(((pred == c) & (y == c)).sum())
    fp, fn = float(((pred == c) & (y != c)).sum()), float(((pred != c) & (y == c)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def write_mlp_bundle(
    out: Path,
    data_dir: Path | None = None,
    *,
    modules: int = 40,
    hidden: int = 4,
    seed: int = 0,
    fit_images: int = 3000,
    specialist_size: int = 20,
    packed: bool = True,
) -> Path:
    """A Fashion-MNIST bundle of `modules` MLP modules in `out` (see the module docstring)."""
    from quorum.exporter.confidence import fit_confidence
    from quorum.exporter.graphs import cpu_session
    from quorum.exporter.packed import write_packed

    raw = load_raw(data_dir)
    x_train, y_train = raw["train"]
    x_test, y_test = raw["test"]
    x_fit, y_fit = x_train[:fit_images], y_train[:fit_images]
    x_val, y_val = x_train[-5000:], y_train[-5000:]
    scale = 1 / 255
    mean, std = float((x_fit * scale).mean()), float((x_fit * scale).std())

    def normalize(a: np.ndarray) -> np.ndarray:  # the runtime's float32 steps
        return (a.astype(np.float32) * np.float32(scale) - np.float32(mean)) / np.float32(std)

    x = normalize(x_fit)
    targets = 4.0 * np.eye(10)[y_fit] - 2.0  # one-hot as logits of ±2
    rng = np.random.default_rng(seed)
    (out / "modules").mkdir(parents=True)
    graphs = []
    for _ in range(modules):
        rows = rng.choice(len(x), len(x))  # a bootstrap resample
        w1 = rng.normal(0.0, 1.0 / np.sqrt(x.shape[1]), (hidden, x.shape[1]))
        b1 = rng.normal(0.0, 0.1, hidden)
        h = np.maximum(x[rows] @ w1.T + b1, 0.0)  # (n, H)
        a = np.c_[h, np.ones(len(h))]
        coef = np.linalg.solve(a.T @ a + 1e-3 * np.eye(hidden + 1), a.T @ targets[rows])  # (H + 1, K) ridge
        graphs.append(_mlp_graph(w1, b1, coef[:-1].T, coef[-1]))

    sessions = [cpu_session(g) for g in graphs]

    def logits(images: np.ndarray) -> np.ndarray:  # (M, N, K)
        z = normalize(images)
        return np.stack([s.run(None, {"input": z})[0] for s in sessions])

    val, test = logits(x_val), logits(x_test)
    val_pred = val.argmax(-1)  # (M, N)
    module_errors = (val_pred != y_val).mean(axis=1)
    entries = []
    for j, g in enumerate(graphs):
        file = f"modules/m{j:03d}.onnx"
        (out / file).write_bytes(g)
        entries.append(
            ModuleEntry(
                id=j,
                file=file,
                sha256=hashlib.sha256(g).hexdigest(),
                params=hidden * (x.shape[1] + 1) + 10 * (hidden + 1),
                flops=2 * hidden * (x.shape[1] + 10),
                val_error=float(module_errors[j]),
                parity=0.0,
            )
        )
    specialists = []
    k = min(specialist_size, modules)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        by_f1 = sorted(range(modules), key=lambda j, c=c: -_f1(val_pred[j], y_val, c))[:k]
        subsets = [rng.choice(modules, k, replace=False) for _ in range(20)]
        specialists.append(
            SpecialistEntry(
                class_index=c,
                class_name=name,
                modules=[int(j) for j in by_f1],
                val_f1=_f1(val[by_f1].mean(0).argmax(-1), y_val, c),
                random_val_f1=float(np.mean([_f1(val[s].mean(0).argmax(-1), y_val, c) for s in subsets])),
                ensemble_val_f1=_f1(val.mean(0).argmax(-1), y_val, c),
            )
        )

    def error_nll(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        p = softmax(z.mean(0).astype(np.float64))
        return float((p.argmax(-1) != y).mean()), float(-np.log(p[np.arange(len(y)), y]).mean())

    (val_error, val_nll), (test_error, test_nll) = error_nll(val, y_val), error_nll(test, y_test)
    packed_entry = None
    if packed:
        probe = normalize(x_val[:256])
        packed_entry = write_packed(
            out, [onnx.load_from_string(g) for g in graphs], "input", "logits", probe, logits(x_val[:256])
        )
    order = [int(j) for j in np.argsort(module_errors, kind="stable")]
    Manifest(
        name=out.name,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        task=TaskSpec(class_names=list(FASHION_MNIST_CLASSES)),
        input=InputSpec(name="input", shape=[784], scale=scale, mean=[mean], std=[std], raw_range=(0.0, 255.0)),
        output=OutputSpec(name="logits"),
        training=TrainingInfo(
            arch="mlp",
            num_modules=modules,
            arch_params={"hidden": hidden},
            lam=0.0,
            dataset="fashion-mnist",
            seed=seed,
            epochs=0,
            best_epoch=0,
            exported_epoch=0,
            lr=0.0,
            batch_size=fit_images,
            command="tests/bundles.py: random ReLU features, output layers fitted by ridge regression",
        ),
        modules=entries,
        anytime_order=order,
        anytime_criterion="module validation error",
        specialists=specialists,
        specialist_criterion="the modules with the highest one-vs-all F1 alone",
        packed=packed_entry,
        metrics=EnsembleMetrics(val_error=val_error, test_error=test_error, val_nll=val_nll, test_nll=test_nll),
        confidence=fit_confidence(val.transpose(1, 0, 2), y_val, order),
    ).dump(out)
    return out


# ---------------------------------------------------------------- regression and count bundles


def _linear_graph(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """input (N, F) -> MatMul (F, D) -> Add (D,) -> logits (N, D), dynamic batch axis."""
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
    from sklearn import datasets
    from sklearn.linear_model import PoissonRegressor

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


def rewrite_module(bundle: Path, j: int, data: bytes) -> None:
    """Replace module j's file and its checksum, so that only later checks can catch it."""
    (bundle / f"modules/m{j:03d}.onnx").write_bytes(data)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["modules"][j]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(raw))


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(100, len(data), 997):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- faulty modules
#
# Real graphs that behave on the load-time probe (random pixels, never exactly 0) and misbehave
# on real images, whose background pixels are 0: a fault that only shows in service.


def _zero_pixel_flag(proto: onnx.ModelProto, manifest: Manifest) -> tuple[onnx.ModelProto, str]:
    """Rename the module's output to `orig` and add `any_zero` (N, 1): 1.0 where a raw pixel is 0."""
    spec = manifest.input
    zero = (np.float32(0) * np.float32(spec.scale) - np.float32(spec.mean[0])) / np.float32(spec.std[0])
    g = proto.graph
    for node in g.node:
        node.output[:] = ["orig" if o == manifest.output.name else o for o in node.output]
    g.initializer.extend(
        [numpy_helper.from_array(np.float32(zero).reshape(()), "zero"), numpy_helper.from_array(np.array([1]), "ax1")]
    )
    g.node.extend(
        [
            helper.make_node("Equal", [spec.name, "zero"], ["is_zero"]),
            helper.make_node("Cast", ["is_zero"], ["is_zero_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["is_zero_f", "ax1"], ["any_zero"], keepdims=1),
        ]
    )
    return proto, "any_zero"


def nan_on_zero_pixels(proto: onnx.ModelProto, manifest: Manifest) -> bytes:
    proto, flag = _zero_pixel_flag(proto, manifest)
    g = proto.graph
    g.initializer.extend([numpy_helper.from_array(np.float32(1).reshape(()), "one_f")])
    g.node.extend(
        [
            helper.make_node("Sub", ["one_f", flag], ["keep"]),
            helper.make_node("Log", ["keep"], ["log_keep"]),  # -inf where a pixel is 0
            helper.make_node("Sub", ["log_keep", "log_keep"], ["nan_or_zero"]),  # -inf - -inf = NaN
            helper.make_node("Add", ["orig", "nan_or_zero"], [manifest.output.name]),
        ]
    )
    return proto.SerializeToString()


def hang_on_zero_pixels(proto: onnx.ModelProto, manifest: Manifest) -> bytes:
    proto, flag = _zero_pixel_flag(proto, manifest)
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["v_in", "step"], ["v_out"])],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.zeros(1, np.float32), "step")],
    )
    g = proto.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([10**12], np.int64), "forever"),
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.zeros(1, np.float32), "v0"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("ReduceMax", [flag], ["any_zero_all"], keepdims=0),
            helper.make_node("Cast", ["any_zero_all"], ["any_zero_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["any_zero_i", "forever"], ["trips"]),  # 0 on the probe
            helper.make_node("Squeeze", ["trips"], ["trip_count"]),
            helper.make_node("Loop", ["trip_count", "true", "v0"], ["v"], body=body),
            helper.make_node("Add", ["orig", "v"], [manifest.output.name]),
        ]
    )
    return proto.SerializeToString()
