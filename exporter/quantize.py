"""Reduced-precision bundles: INT8 or FP16 graphs made from an FP32 bundle, kept only if accurate.

    quorum quantize bundles/demo --out bundles/demo-int8            (or: quorum export RUN --precision int8)

INT8 has two methods:

- weights (default): every weight matrix is stored as int8, one scale per output unit, and
  dequantized inside the graph (DequantizeLinear); activations stay float32. The packed graph
  stores the same int8 values and scales and dequantizes the rows it gathers, so it answers
  what the module graphs answer, to float rounding, and the runtime verifies it as it does at FP32.
- static: ONNX Runtime's static quantization (QDQ, int8 weights per channel, int8 activations
  calibrated on validation images). Its module graphs compute in int8, which no float packed
  graph reproduces on the runtime's probe inputs, so such a bundle has no packed graph.

FP16: every graph computes in float16 (for GPU targets). At every precision the graphs take and
give float32, so the runtime and its clients feed the same arrays.

The test accuracy of the anytime order at the standard budgets is measured against the FP32
source, through the module graphs and the packed graph; a bundle that loses more than
`tolerance` points at any budget is refused with the numbers, and none is written.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm.auto import tqdm

from quorum.exporter.errors import ExportError
from quorum.exporter.graphs import cpu_session, int8_symmetric, serialize, staged_bundle, to_float16
from quorum.exporter.packed import INDEX_NAME, module_protos, write_packed
from quorum.runtime.manifest import (
    PARITY_RTOL,
    BudgetAccuracy,
    EnsembleMetrics,
    Manifest,
    PrecisionInfo,
    probe_input,
)
from quorum.trainer.data import load_dataset

__all__ = [
    "METHODS",
    "PRECISIONS",
    "STANDARD_BUDGETS",
    "QuantizeConfig",
    "int8_weights",
    "quantize_bundle",
    "strip_metadata",
]

PRECISIONS = ("fp32", "int8", "fp16")
STANDARD_BUDGETS = (1, 8, 32, 128, 256)  # the budgets a bundle's accuracy is reported at (and `quorum demo`'s)
METHODS = ("weights", "static")
FP16_PARITY_RTOL = 2e-3  # float16 keeps 11 significant bits: ~5e-4 per operation; a wrong graph is off by O(1)


@dataclass(frozen=True)
class QuantizeConfig:
    precision: str = "int8"  # int8 or fp16
    method: str = "weights"  # int8: weights (int8 weights, float activations) or static (int8 activations too)
    tolerance: float = 0.5  # test-accuracy points any standard budget may lose against the FP32 source
    calibration: int = 1000  # validation images that calibrate the int8 activation ranges
    val_size: int = 10_000  # the run's validation hold-out (the trainer's default)
    data_dir: str | None = None  # the dataset's folder, if not the default

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp16"):
            raise ExportError(f"precision must be int8 or fp16 to quantize, got {self.precision!r}")
        if self.method not in METHODS:
            raise ExportError(f"--method must be weights or static, got {self.method!r}")
        if not 0 <= self.tolerance <= 100:
            raise ExportError(f"--tolerance is in accuracy points, 0..100; got {self.tolerance}")
        if self.calibration < 1:
            raise ExportError(f"--calibration needs at least 1 validation image, got {self.calibration}")


def quantize_bundle(
    src: str | Path, out: str | Path, cfg: QuantizeConfig, *, overwrite: bool = False, progress: bool = True
) -> Manifest:
    """Write the `cfg.precision` version of the FP32 bundle `src` to `out`; its manifest.

    ExportError, with nothing written, when the quantized bundle loses more than `cfg.tolerance`
    test-accuracy points at a standard budget, or when `src` cannot be quantized."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if out.resolve() == src.resolve():
        raise ExportError("--out must differ from the FP32 bundle: the source stays as it is")
    manifest = Manifest.load(src)
    if manifest.precision is not None:
        raise ExportError(
            f"{src} is already {manifest.precision.dtype}; quantize its FP32 source {manifest.precision.source}"
        )
    if not manifest.task.task.has_classes or manifest.trunk is not None:
        raise ExportError("quantizing knows classification bundles without a shared trunk only")
    protos = module_protos(src, manifest, "quantizing")
    data = load_dataset(manifest.training.dataset, cfg.data_dir, val_size=cfg.val_size, seed=manifest.training.seed)
    shape = (-1, *manifest.input.shape)
    x_val = data.val.x.numpy().reshape(shape)
    x_test, y_test = data.test.x.numpy().reshape(shape), data.test.y.numpy()
    calib = x_val[: cfg.calibration]

    with staged_bundle(out) as tmp:
        (tmp / "modules").mkdir()
        entries, new_protos = [], []
        bar = tqdm(manifest.modules, desc=cfg.precision, unit="module", disable=not progress)
        for entry, proto in zip(bar, protos, strict=True):
            q = _quantize_module(proto, cfg, manifest.input.name, calib, tmp)
            q.doc_string = f"{proto.doc_string} ({cfg.precision})"
            data_bytes, digest = serialize(q)
            (tmp / entry.file).write_bytes(data_bytes)
            new_protos.append(q)
            diff = _max_diff(_logits([proto], calib, manifest)[0], _logits([q], calib, manifest)[0])
            entries.append(entry.model_copy(update={"sha256": digest, "parity": diff}))
        src_test = _logits(protos, x_test, manifest)  # (M, N, K)
        q_test = _logits(new_protos, x_test, manifest)
        q_val = _logits(new_protos, x_val, manifest)
        rtol = PARITY_RTOL if cfg.precision == "int8" else FP16_PARITY_RTOL
        packed = None
        if manifest.packed is not None and not (cfg.precision == "int8" and cfg.method == "static"):
            # checked on the runtime's own probe inputs, so that the runtime accepts what is written
            probe = probe_input(manifest.input, n=256)
            packed = write_packed(
                tmp, protos, manifest.input.name, manifest.output.name, probe, _logits(new_protos, probe, manifest),
                precision=cfg.precision, rtol=rtol,
            )  # fmt: skip
        order = manifest.anytime_order
        budgets = sorted({b for b in STANDARD_BUDGETS if b <= len(order)} | {len(order)})  # and the whole ensemble
        packed_acc = _packed_accuracy(tmp / packed.file, manifest, x_test, y_test, budgets) if packed else {}
        accuracy = [
            BudgetAccuracy(
                budget=b,
                modules=_accuracy(q_test[order[:b]], y_test),
                packed=packed_acc.get(b),
                fp32=_accuracy(src_test[order[:b]], y_test),
            )
            for b in budgets
        ]
        _check_tolerance(accuracy, cfg.tolerance, cfg.precision)
        precision = PrecisionInfo(
            dtype=cfg.precision,
            activations=_ACTIVATIONS[cfg.method if cfg.precision == "int8" else "fp16"],
            method=_METHODS[cfg.method if cfg.precision == "int8" else "fp16"].format(n=len(calib)),
            source=manifest.name,
            tolerance=cfg.tolerance,
            parity_rtol=rtol,
            accuracy=accuracy,
        )
        new = manifest.model_copy(
            update={
                "name": out.name,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "modules": entries,
                "packed": packed,
                "precision": precision,
                "metrics": _metrics(q_val, data.val.y.numpy(), q_test, y_test),
            }
        )
        new = Manifest.model_validate(new.model_dump())  # validated as a reader will
        new.dump(tmp)
    return new


_ACTIVATIONS = {"weights": "float32", "static": "int8", "fp16": "float16"}
_METHODS = {
    "weights": "int8 weights, symmetric, one scale per output unit, dequantized in the graph (by the runtime once, "
    "at load); float32 activations",
    "static": "onnxruntime.quantization static QDQ: int8 weights per output channel, int8 activations calibrated "
    "(min-max) on {n} validation images; no packed graph",
    "fp16": "float16 weights and arithmetic, float32 inputs and outputs (Cast nodes inside)",
}


def _quantize_module(
    proto: onnx.ModelProto, cfg: QuantizeConfig, input_name: str, calib: np.ndarray, workdir: Path
) -> onnx.ModelProto:
    """One module graph at the configured precision and method, without the exporter's metadata."""
    if cfg.precision == "fp16":
        q = to_float16(proto)
    elif cfg.method == "weights":
        q = int8_weights(proto)
    else:
        q = _static_int8(proto, input_name, calib, workdir)
    strip_metadata(q.graph)
    return q


def strip_metadata(graph: onnx.GraphProto) -> None:
    """Drop what torch's exporter notes on every node and tensor (source locations, class names):
    about 2.5 kB a module, most of a small quantized module's bytes."""
    for item in (*graph.node, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
    del graph.value_info[:]  # intermediate shapes: bytes the runtime does not need


def int8_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose weight matrices (float initializers of 2 or more axes) are int8, one
    scale per output unit (axis 0: a Gemm's rows with transB, a Conv's output channels), each
    dequantized by a DequantizeLinear node in front of the graph. Biases stay float32."""
    q_proto = onnx.ModelProto()
    q_proto.CopyFrom(proto)
    graph = q_proto.graph
    kept, dequantize = [], []
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.ndim < 2:
            kept.append(init)
            continue
        q, scale = int8_symmetric(w, tuple(range(1, w.ndim)))
        kept += [
            numpy_helper.from_array(q, f"{init.name}_q"),
            numpy_helper.from_array(scale.reshape(-1), f"{init.name}_scale"),
        ]
        dequantize.append(
            helper.make_node("DequantizeLinear", [f"{init.name}_q", f"{init.name}_scale"], [init.name], axis=0)
        )
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [*dequantize, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return q_proto


def _static_int8(proto: onnx.ModelProto, input_name: str, calib: np.ndarray, workdir: Path) -> onnx.ModelProto:
    """ONNX Runtime's static QDQ quantization of one module graph, calibrated on `calib`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Calibration(CalibrationDataReader):
        """The calibration images, as one batch."""

        def __init__(self) -> None:
            self._batches = iter([{input_name: calib}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    clean = onnx.ModelProto()
    clean.CopyFrom(proto)
    del clean.graph.value_info[:]  # the exporter's stale shapes would fail the quantizer's shape inference
    path = workdir / "quantized.onnx"
    logging.disable(logging.WARNING)  # the quantizer advises pre-processing on the root logger, every module
    try:
        quantize_static(
            clean,
            path,
            _Calibration(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            # logits stay float: 256 levels of a module's logits tie its argmax on near inputs
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
        )
    finally:
        logging.disable(logging.NOTSET)
    q = onnx.load(path)
    path.unlink()
    return q


def _logits(protos: Sequence[onnx.ModelProto], x: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(M, N, K) logits of each graph on x, in chunks of 1000 inputs."""
    out = np.empty((len(protos), len(x), manifest.num_classes), np.float32)
    for j, proto in enumerate(protos):
        session = cpu_session(proto.SerializeToString())
        for i in range(0, len(x), 1000):
            out[j, i : i + 1000] = session.run([manifest.output.name], {manifest.input.name: x[i : i + 1000]})[0]
    return out


def _packed_accuracy(
    path: Path, manifest: Manifest, x: np.ndarray, y: np.ndarray, budgets: Sequence[int]
) -> dict[int, float]:
    """Test accuracy of the packed graph at each budget of the anytime order."""
    session = cpu_session(path.read_bytes())
    acc = {}
    for b in budgets:
        ids = np.asarray(manifest.anytime_order[:b], np.int64)
        labels = np.concatenate(
            [
                session.run([manifest.output.name], {manifest.input.name: x[i : i + 1000], INDEX_NAME: ids})[0].argmax(
                    1
                )
                for i in range(0, len(x), 1000)
            ]
        )
        acc[b] = float((labels == y).mean())
    return acc


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the mean of (b, N, K) logits."""
    return float((logits.mean(axis=0).argmax(axis=1) == y).mean())


def _check_tolerance(accuracy: Sequence[BudgetAccuracy], tolerance: float, precision: str) -> None:
    """ExportError listing every budget if any loses more than `tolerance` points against FP32."""
    worst = max(max(a.fp32 - a.modules, a.fp32 - (a.packed if a.packed is not None else a.fp32)) for a in accuracy)
    if 100 * worst <= tolerance + 1e-9:
        return
    rows = "; ".join(
        f"budget {a.budget}: fp32 {100 * a.fp32:.2f} %, modules {100 * a.modules:.2f} %"
        + (f", packed {100 * a.packed:.2f} %" if a.packed is not None else "")
        for a in accuracy
    )
    raise ExportError(
        f"the {precision} bundle loses {100 * worst:.2f} test-accuracy points against its FP32 source, more than "
        f"the tolerance of {tolerance:g} ({rows}); nothing was written. Keep the FP32 bundle, or pass a larger "
        "--tolerance if that loss is acceptable"
    )


def _metrics(val: np.ndarray, y_val: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> EnsembleMetrics:
    """Error rate and NLL of the whole ensemble (mean logits, softmax) from (M, N, K) logits."""

    def error_nll(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        z = logits.mean(axis=0).astype(np.float64)  # (N, K)
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float((z.argmax(axis=1) != y).mean()), float(-log_p[np.arange(len(y)), y].mean())

    val_error, val_nll = error_nll(val, y_val)
    test_error, test_nll = error_nll(test, y_test)
    return EnsembleMetrics(val_error=val_error, test_error=test_error, val_nll=val_nll, test_nll=test_nll)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if np.isfinite(b).all() else float("inf")
