"""Serving on ONNX Runtime's CUDA execution provider against the CPU, side by side in one run.

    python bench/gpu_serving.py --bundle bundles/demo [--json out.json]

For the packed and the isolated executor: parity (max |Δ probability| and label agreement of the
CUDA engine against the CPU engine on the same inputs, random images in the manifest's raw range)
and the median Engine.predict time at batch 1 and 64 for budgets 8, 32 and 256, CPU and CUDA.
Then the packed graph alone, fed from host memory against fed through I/O binding with the input
already on the GPU: whether binding pays at these sizes. Exits 3, after saying so, where the CUDA
provider does not load (no GPU, or ONNX Runtime's CPU wheel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from quorum.runtime.engine import Engine
from quorum.runtime.manifest import Manifest, probe_input
from quorum.runtime.providers import CUDA, requested_providers

BUDGETS = (8, 32, 256)
BATCHES = (1, 64)
PROB_ATOL = 1e-3  # as tests/runtime/test_cuda.py


def median_us(call: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def engines(bundle: Path, m: Manifest, repeats: int) -> list[dict[str, object]]:
    lo, hi = m.input.raw_range or (0.0, 1.0)
    x = np.random.default_rng(0).uniform(lo, hi, size=(max(BATCHES), *m.input.shape)).round().astype(np.float32)
    rows: list[dict[str, object]] = []
    for executor in ("packed", "isolated"):
        cpu = Engine.load(bundle, device="cpu", executor=executor)  # type: ignore[arg-type]
        gpu = Engine.load(bundle, device="cuda", executor=executor)  # type: ignore[arg-type]
        try:
            for budget in BUDGETS:
                b = min(budget, len(m.modules))
                for batch in BATCHES:
                    a, g = cpu.predict(x[:batch], budget=b), gpu.predict(x[:batch], budget=b)
                    rows.append(
                        {
                            "executor": executor,
                            "budget": b,
                            "batch": batch,
                            "max_dprob": float(np.abs(a.probabilities - g.probabilities).max()),
                            "label_agreement": float((a.labels == g.labels).mean()),
                            "cpu_us": median_us(
                                lambda b=b, batch=batch, e=cpu: e.predict(x[:batch], budget=b), repeats
                            ),
                            "cuda_us": median_us(
                                lambda b=b, batch=batch, e=gpu: e.predict(x[:batch], budget=b), repeats
                            ),
                            "providers": gpu.providers,
                        }
                    )
        finally:
            cpu.close()
            gpu.close()
    return rows


def io_binding(bundle: Path, m: Manifest, repeats: int) -> list[dict[str, object]]:
    """The packed graph on CUDA: numpy feeds against an input bound on the GPU and logits bound to the host."""
    if m.packed is None:
        return []
    session = ort.InferenceSession(str(bundle / m.packed.file), providers=[CUDA, "CPUExecutionProvider"])
    rows: list[dict[str, object]] = []
    for budget in BUDGETS:
        ids = np.asarray(m.anytime_order[: min(budget, len(m.modules))], np.int64)
        for batch in BATCHES:
            x = probe_input(m.input, n=batch)
            feeds = {m.input.name: x, m.packed.index_input: ids}
            plain = median_us(lambda feeds=feeds: session.run([m.output.name], feeds), repeats)
            binding = session.io_binding()
            binding.bind_ortvalue_input(m.input.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            binding.bind_cpu_input(m.packed.index_input, ids)
            binding.bind_output(m.output.name, "cpu")
            bound = median_us(lambda binding=binding: session.run_with_iobinding(binding), repeats)
            rows.append({"budget": len(ids), "batch": batch, "numpy_us": plain, "iobinding_us": bound})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="an FP32 bundle (default: bundles/demo)")
    p.add_argument("--repeats", type=int, default=200, help="calls per timing (default: 200)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    if CUDA not in requested_providers("auto"):
        print(f"no CUDA execution provider here ({ort.get_available_providers()}): nothing measured", file=sys.stderr)
        return 3
    m = Manifest.load(args.bundle)
    result = {"engines": engines(args.bundle, m, args.repeats), "io_binding": io_binding(args.bundle, m, args.repeats)}
    print("| executor | budget | batch | max Δp | labels agree | CPU µs | CUDA µs | CUDA/CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["engines"]:
        ratio = float(r["cuda_us"]) / float(r["cpu_us"])  # type: ignore[arg-type]
        print(
            f"| {r['executor']} | {r['budget']} | {r['batch']} | {r['max_dprob']:.1e} | {r['label_agreement']:.4f} "
            f"| {r['cpu_us']:.0f} | {r['cuda_us']:.0f} | {ratio:.2f} |"
        )
    print("\n| packed graph on CUDA: budget | batch | numpy feeds µs | I/O binding µs |\n|---|---|---|---|")
    for r in result["io_binding"]:
        print(f"| {r['budget']} | {r['batch']} | {r['numpy_us']:.0f} | {r['iobinding_us']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    bad = [r for r in result["engines"] if float(r["max_dprob"]) > PROB_ATOL]  # type: ignore[arg-type]
    if bad:
        print(f"CUDA and CPU differ beyond {PROB_ATOL:g} in {len(bad)} cells", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
