"""What a small device cares about, FP32 against reduced precision, side by side in one run.

    python bench/footprint.py --pair 256-M-4-H bundles/demo bundles/demo-int8 \
                              --pair ConvNet bundles/conv bundles/conv-int8 [--json out.json]

(make the reduced bundles with `quorum quantize BUNDLE --out NEW`). For every bundle:

  size         bytes of its files, and what they take on disk (4 KiB blocks: `du`)
  cold start   from starting `quorum serve` to the first 200 from /readyz, and Engine.load alone
               (in a fresh process whose imports are done), median of --starts
  memory       resident memory (RSS) of the server at idle after start, and its peak (VmHWM)
               after --load-s seconds of 16 keep-alive connections posting one image at budget 32
  latency      Engine.predict in this process (default executor: the packed graph where the bundle
               has one), median over --repeats calls, at batch 1 and 64 and budgets 8, 32, 256
               (a budget above M is M); the two bundles of a pair called in turn

and the ratio of each reduced-precision number to its FP32 bundle's, measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _serve import free_port, peak_rss_mb, rss_mb, start_server  # bench/ is on sys.path

from quorum.runtime.engine import Engine
from quorum.runtime.manifest import Manifest

BUDGETS = (8, 32, 256)
BATCHES = (1, 64)
CONNECTIONS = 16


def size(bundle: Path) -> tuple[int, int]:
    """(bytes of the bundle's files, bytes of disk blocks they take)."""
    files = [f for f in bundle.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)


def cold_start(bundle: Path) -> tuple[float, subprocess.Popen[bytes]]:
    """Seconds from starting `quorum serve` to the first 200 from /readyz; the server, still running."""
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(str(bundle), port, poll_s=0.01)
    return time.perf_counter() - t0, proc


_LOAD_ONLY = """
import sys, time
from quorum.runtime.engine import Engine
t0 = time.perf_counter()
engine = Engine.load(sys.argv[1])
print(time.perf_counter() - t0)
engine.close()
"""


def engine_load(bundle: Path) -> float:
    """Seconds Engine.load takes in a fresh process, its imports done."""
    out = subprocess.run([sys.executable, "-c", _LOAD_ONLY, str(bundle)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def load(port: int, body: bytes, seconds: float) -> int:
    """CONNECTIONS keep-alive connections posting `body` for `seconds`; the requests answered."""
    stop = time.monotonic() + seconds
    done = [0] * CONNECTIONS

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", "/predict?budget=32", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"POST /predict answered {r.status}")
            done[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def latencies_us(engines: list[Engine], x: np.ndarray, budget: int, repeats: int) -> list[float]:
    """Median µs of each engine's predict(x, budget), the engines called in turn (so that the
    machine's drift falls on both alike), after a few warm-up calls (which cache and compile)."""
    for _ in range(5):
        for engine in engines:
            engine.predict(x, budget=budget)
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(repeats):
        for engine, t in zip(engines, times, strict=True):
            t0 = time.perf_counter()
            engine.predict(x, budget=budget)
            t.append(time.perf_counter() - t0)
    return [1e6 * statistics.median(t) for t in times]


def measure(bundle: Path, args: argparse.Namespace) -> dict[str, float]:
    m = Manifest.load(bundle)
    row: dict[str, float] = {}
    row["bytes"], row["disk_bytes"] = size(bundle)
    starts, loads = [], []
    for i in range(args.starts):
        seconds, proc = cold_start(bundle)
        starts.append(seconds)
        if i < args.starts - 1:
            proc.terminate()
            proc.wait(timeout=30)
    try:
        time.sleep(1.0)
        row["rss_idle_mb"] = rss_mb(proc.pid)
        raw = np.random.default_rng(0).uniform(0, 255, size=(1, *m.input.shape)).round()
        port = int(proc.args[-1])  # type: ignore[index]
        row["load_requests"] = load(port, json.dumps({"inputs": raw.tolist()}).encode(), args.load_s)
        row["rss_peak_mb"] = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    loads = [engine_load(bundle) for _ in range(args.starts)]
    row["ready_s"], row["engine_load_s"] = statistics.median(starts), statistics.median(loads)
    return row


def latency(bundles: list[Path], rows: list[dict[str, float]], repeats: int) -> None:
    """Fill each row with its bundle's predict latencies, the bundles of a pair measured side by side."""
    m = Manifest.load(bundles[0])
    engines = [Engine.load(b) for b in bundles]
    try:
        lo, hi = m.input.raw_range or (0.0, 1.0)
        x = np.random.default_rng(1).uniform(lo, hi, size=(max(BATCHES), *m.input.shape)).astype(np.float32)
        for batch in BATCHES:
            for budget in BUDGETS:
                b = min(budget, len(m.modules))
                for row, us in zip(rows, latencies_us(engines, x[:batch], b, repeats), strict=True):
                    row[f"us_b{budget}_n{batch}"] = us
    finally:
        for engine in engines:
            engine.close()


ROWS = [
    ("bytes", "size (MB)", 1e-6),
    ("disk_bytes", "size on disk (MB)", 1e-6),
    ("ready_s", "cold start to /readyz (s)", 1),
    ("engine_load_s", "Engine.load alone (s)", 1),
    ("rss_idle_mb", "RSS idle (MiB)", 1),
    ("rss_peak_mb", f"RSS peak, {CONNECTIONS} connections (MiB)", 1),
    *[
        (f"us_b{budget}_n{batch}", f"predict batch {batch}, budget {budget} (µs)", 1)
        for batch in BATCHES
        for budget in BUDGETS
    ],
]


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per measure; for each pair, FP32, the reduced bundle and their ratio."""
    head = ["measure"]
    for name, pair in results.items():
        low = next(k for k in pair if k != "fp32")
        head += [f"{name} fp32", f"{name} {low}", f"{low}/fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, unit in ROWS:
        cells = [label]
        for pair in results.values():
            fp32, low = pair["fp32"][key], next(v for k, v in pair.items() if k != "fp32")[key]
            cells += [f"{fp32 * unit:.3g}", f"{low * unit:.3g}", f"{low / fp32:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pair",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "FP32", "REDUCED"),
        help="a name and two bundles of the same run: FP32 and its quantized copy (repeat)",
    )
    p.add_argument("--starts", type=int, default=3, help="cold starts (and engine loads) per bundle (default: 3)")
    p.add_argument("--load-s", type=float, default=5.0, help="seconds of 16-connection load (default: 5)")
    p.add_argument("--repeats", type=int, default=200, help="predict calls per latency cell (default: 200)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, fp32, reduced in args.pair:
        low = Manifest.load(reduced).precision
        if Manifest.load(fp32).precision is not None or low is None:
            raise SystemExit(f"{name}: give the FP32 bundle first, then its reduced-precision copy")
        results[name] = {}
        for label, bundle in (("fp32", fp32), (low.dtype, reduced)):
            print(f"== {name} {label}: {bundle}", file=sys.stderr, flush=True)
            results[name][label] = measure(Path(bundle), args)
        latency([Path(fp32), Path(reduced)], list(results[name].values()), args.repeats)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
