"""Ways to make a module graph INT8, side by side on one FP32 bundle's first modules of the anytime order.

    python bench/quantization.py --bundle bundles/demo --modules 32

For each way, over the first --modules modules: bytes of a module graph (median), test accuracy of
their mean logits at budgets 8 and --modules, and the median time of one module session's run at
batch 1 and 64 (module 0 of the order; one thread, as the runtime runs them), with its ratio to FP32.

  fp32            the bundle's graph
  int8 weights    `quorum quantize` (default): int8 weights per output unit, DequantizeLinear in the graph,
                  folded at load as the runtime does
  static QDQ pc   `quorum quantize --method static`: onnxruntime static QDQ, per-channel weights
  static QDQ      the same with one scale per weight tensor
  static QOp      static, QOperator format (QGemm nodes), uint8 activations
  dynamic         onnxruntime dynamic quantization: int8 weights, activations quantized per call
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from quorum.exporter.graphs import cpu_session
from quorum.exporter.packed import module_protos
from quorum.exporter.quantize import int8_weights, strip_metadata
from quorum.runtime.manifest import Manifest
from quorum.runtime.providers import session_options
from quorum.trainer.data import load_dataset


def _reader(name: str, x: np.ndarray) -> CalibrationDataReader:
    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Reader()


def ways(input_name: str, calib: np.ndarray, tmp: Path) -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]]:
    def ort_tool(quantize: Callable[[Path, Path], None]) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
        def run(proto: onnx.ModelProto) -> onnx.ModelProto:
            clean = onnx.ModelProto()
            clean.CopyFrom(proto)
            strip_metadata(clean.graph)  # the exporter's stale shapes fail the quantizer's shape inference
            src, dst = tmp / "src.onnx", tmp / "dst.onnx"
            onnx.save(clean, src)
            quantize(src, dst)
            return onnx.load(dst)

        return run

    def static(fmt: QuantFormat, per_channel: bool, activations: QuantType) -> Callable[[Path, Path], None]:
        return lambda src, dst: quantize_static(
            src, dst, _reader(input_name, calib), quant_format=fmt, per_channel=per_channel,
            activation_type=activations, weight_type=QuantType.QInt8,
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
        )  # fmt: skip

    return {
        "fp32": lambda p: p,
        "int8 weights": int8_weights,
        "static QDQ pc": ort_tool(static(QuantFormat.QDQ, True, QuantType.QInt8)),
        "static QDQ": ort_tool(static(QuantFormat.QDQ, False, QuantType.QInt8)),
        "static QOp": ort_tool(static(QuantFormat.QOperator, False, QuantType.QUInt8)),
        "dynamic": ort_tool(lambda src, dst: quantize_dynamic(src, dst, weight_type=QuantType.QInt8)),
    }


def run_us(session: object, feeds: dict[str, np.ndarray], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="an FP32 MLP bundle")
    p.add_argument("--modules", type=int, default=32, help="modules of the anytime order to quantize (default: 32)")
    p.add_argument("--calibration", type=int, default=1000, help="validation images for static calibration")
    p.add_argument("--repeats", type=int, default=2000, help="runs per timing (default: 2000)")
    p.add_argument("--data-dir", help="dataset folder (default: $QUORUM_DATA_DIR or Debian's)")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # the quantizer's advice to pre-process, once a module
    m = Manifest.load(args.bundle)
    data = load_dataset(m.training.dataset, args.data_dir, seed=m.training.seed)
    shape = (-1, *m.input.shape)
    calib = data.val.x.numpy().reshape(shape)[: args.calibration]
    x_test, y_test = data.test.x.numpy().reshape(shape), data.test.y.numpy()
    ids = m.anytime_order[: args.modules]
    protos = module_protos(args.bundle, m, "quantizing")
    budgets = sorted({min(8, len(ids)), len(ids)})
    print(f"{args.bundle}, first {len(ids)} modules of the anytime order; test accuracy of their mean logits")
    accs = " | ".join(f"acc b={b}" for b in budgets)
    print(f"| way | bytes/module | {accs} | µs n=1 | µs n=64 | n=1 / fp32 | n=64 / fp32 |")
    print("|---|---|" + "---|" * (len(budgets) + 4))
    base: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, way in ways(m.input.name, calib, Path(tmp)).items():
            graphs = []
            for j in ids:
                q = way(protos[j])
                if name != "fp32":
                    strip_metadata(q.graph)  # as `quorum quantize` writes them
                graphs.append(q.SerializeToString())
            logits = np.stack([cpu_session(g).run(None, {m.input.name: x_test})[0] for g in graphs])  # (b, N, K)
            acc = [float((logits[:b].mean(0).argmax(1) == y_test).mean()) for b in budgets]
            # int8 weights: dequantized once at load, as the runtime does for such bundles
            opts = session_options(fold_dequantize=name == "int8 weights")
            session = ort.InferenceSession(graphs[0], opts, providers=["CPUExecutionProvider"])
            us = [run_us(session, {m.input.name: x_test[:n]}, args.repeats) for n in (1, 64)]
            base = base or us
            cells = [f"{statistics.median(len(g) for g in graphs):.0f}", *(f"{100 * a:.2f} %" for a in acc)]
            cells += [f"{us[0]:.1f}", f"{us[1]:.1f}", f"{us[0] / base[0]:.2f}", f"{us[1] / base[1]:.2f}"]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
