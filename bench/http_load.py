"""HTTP: Quorum's /predict?budget=32 against a bare FastAPI endpoint over one fused session.

    apt-get install -y wrk            # the load generator (Debian's package)
    python bench/http_load.py --bundle bundles/demo

Both servers run under uvicorn on 127.0.0.1 (one process each, started here, one at a time)
and are loaded by wrk with 16 connections for --seconds each, in alternating rounds; each
figure is the median over rounds. Bodies carry one real Fashion-MNIST test image:

  bare            POST /predict to a minimal FastAPI app: orjson in, one ONNX Runtime session of
                  the first 32 modules of the anytime order fused into one graph, orjson out
  quorum json     POST /predict?budget=32 with {"inputs": [[...784 values...]]}
  quorum uint8    the same image as 784 raw bytes (application/octet-stream, X-Dtype: uint8)
  quorum npy      the same image as a .npy file

Then batch 64 with JSON and with raw uint8 bytes, to show what the binary body buys, and the
in-process cost of parsing a 64-image JSON body with the standard library and with orjson.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _serve import free_port, log_tail  # bench/ is on sys.path when a script runs
from fastapi import FastAPI, Request, Response  # at module level: the endpoint's annotations resolve here

from quorum.core.datasets import load_raw, resolve_data_dir

HERE = Path(__file__).resolve().parent


def bare_app(bundle: str, budget: int) -> Any:
    """The baseline: the least a FastAPI endpoint can do to answer with the same modules (inline, async)."""
    import onnx
    import onnxruntime as ort

    from quorum.runtime.manifest import Manifest
    from quorum.runtime.providers import session_options

    sys.path.insert(0, str(HERE))
    from inference import fused_graph

    m = Manifest.load(bundle)
    protos = [onnx.load(Path(bundle) / m.modules[j].file) for j in m.anytime_order[:budget]]
    session = ort.InferenceSession(
        fused_graph(protos, m.input.name, m.output.name), session_options(), providers=["CPUExecutionProvider"]
    )
    mean, std, scale = np.float32(m.input.mean[0]), np.float32(m.input.std[0]), np.float32(m.input.scale)
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        x = (np.asarray(orjson.loads(await request.body())["inputs"], np.float32) * scale - mean) / std
        z = session.run(None, {m.input.name: x})[0]
        p = np.exp(z - z.max(1, keepdims=True))
        return Response(orjson.dumps({"probabilities": (p / p.sum(1, keepdims=True)).tolist()}))

    return app


def start(kind: str, bundle: str, budget: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind == "quorum":
        cmd = [sys.executable, "-m", "quorum", "serve", bundle, "--port", str(port)]
        env["QUORUM_LOG_LEVEL"] = "warning"
        env["QUORUM_MAX_BATCH"] = "64"
    else:
        cmd = [sys.executable, __file__, "--serve-bare", str(port), "--bundle", bundle, "--budget", str(budget)]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the server runs: a full pipe would stall it)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=log
    )  # a file: a full pipe would stall the server
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited: {log_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start in 60 s")


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
{extra}
local f = io.open("{path}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def wrk(url: str, path: str, body: bytes, headers: dict[str, str], seconds: float, connections: int) -> dict:
    """Run wrk; requests/s, p50 and p99 in ms, and how many answers were not 2xx."""
    with tempfile.TemporaryDirectory() as tmp:
        body_file, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_file.write_bytes(body)
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items() if k != "Content-Type")
        script.write_text(LUA.format(content_type=headers["Content-Type"], extra=extra, path=body_file))
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url + path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/demo")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.serve_bare:
        import uvicorn

        uvicorn.run(bare_app(args.bundle, args.budget), host="127.0.0.1", port=args.serve_bare, log_level="warning")
        return

    images = load_raw(resolve_data_dir())["test"][0]
    one, batch = images[:1], images[:64]
    json_headers = {"Content-Type": "application/json"}
    raw_headers = {"Content-Type": "application/octet-stream", "X-Dtype": "uint8"}
    q = f"/predict?budget={args.budget}"
    cases = {
        "bare, json, batch 1": ("bare", "/predict", orjson.dumps({"inputs": one.tolist()}), json_headers),
        "quorum, json, batch 1": ("quorum", q, orjson.dumps({"inputs": one.tolist()}), json_headers),
        "quorum, uint8, batch 1": ("quorum", q, one.tobytes(), {**raw_headers, "X-Shape": "1,784"}),
        "quorum, npy, batch 1": ("quorum", q, npy(one), {"Content-Type": "application/x-npy"}),
        "quorum, json, batch 64": ("quorum", q, orjson.dumps({"inputs": batch.tolist()}), json_headers),
        "quorum, uint8, batch 64": ("quorum", q, batch.tobytes(), {**raw_headers, "X-Shape": "64,784"}),
    }
    samples: dict[str, list[dict]] = {name: [] for name in cases}
    print(
        f"wrk -t2 -c{args.connections} -d{args.seconds:g}s, {args.rounds} alternating rounds, "
        f"bundle {args.bundle}, budget {args.budget}\n"
    )
    for r in range(args.rounds):
        for kind in ("bare", "quorum"):
            proc, url = start(kind, args.bundle, args.budget)
            try:
                for name, (k, path, body, headers) in cases.items():
                    if k == kind:
                        samples[name].append(res := wrk(url, path, body, headers, args.seconds, args.connections))
                        print(
                            f"  round {r + 1} {name:<24} {res['rps']:8.0f} req/s  p50 {res['p50_ms']:6.2f} ms  "
                            f"p99 {res['p99_ms']:6.2f} ms  non-2xx {res['non_2xx']} {res['socket_errors']}"
                        )
            finally:
                proc.terminate()
                proc.wait(10)
    result = {
        name: {k: statistics.median(s[k] for s in runs) for k in ("rps", "p50_ms", "p99_ms", "non_2xx")}
        for name, runs in samples.items()
    }
    print(f"\n{'case':<26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>8} {'vs bare':>8}")
    bare = result["bare, json, batch 1"]["rps"]
    for name, v in result.items():
        print(
            f"{name:<26} {v['rps']:8.0f} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} "
            f"{v['p99_ms'] / v['p50_ms']:8.2f} {v['rps'] / bare:8.2f}"
        )
    goal = result["quorum, json, batch 1"]
    print(
        f"\nquorum / bare throughput = {goal['rps'] / bare:.2f} (goal >= 0.70); "
        f"quorum p99 / p50 = {goal['p99_ms'] / goal['p50_ms']:.2f} (goal <= 3)"
    )

    body = orjson.dumps({"inputs": batch.tolist()})
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        np.asarray(json.loads(body)["inputs"])
    t_std = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        np.asarray(orjson.loads(body)["inputs"])
    t_orjson = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        np.frombuffer(batch.tobytes(), np.uint8).reshape(64, 784)
    t_raw = (time.perf_counter() - t0) / n * 1e3
    print(
        f"\nparse a 64-image body to an array, in process: json {t_std:.2f} ms, orjson {t_orjson:.2f} ms, "
        f"raw bytes {t_raw:.3f} ms"
    )
    if args.json:
        result["parse_ms"] = {"json": t_std, "orjson": t_orjson, "raw": t_raw}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
