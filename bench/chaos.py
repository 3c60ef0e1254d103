"""Chaos load test: many concurrent requests to a real server while a share of module runs fail.

    python bench/chaos.py --bundle bundles/demo                       # 10,000 requests, 32 clients, 30 % faults

Starts `quorum serve` on a free loopback port with an admin token, installs a server-wide
fault plan through PUT /admin/faults (module runs raise, hang past the module timeout, or
return NaN, in proportions 5:2:3 of --failure-rate), then sends --requests POST /predict
requests with one real test image each from --concurrency client threads over keep-alive
connections. It checks that:

  - no answer is a 5xx, and every request gets an answer (none lost);
  - every answer's `degraded` is true exactly when modules failed (injected or real);
  - every answer used exactly the modules requested minus those that failed.

It prints throughput, latency percentiles, and counts, and exits 1 if a check failed.
Breakers are off (QUORUM_BREAKER_FAILURES=0) so that the failure rate stays what was asked.
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from _serve import free_port, peak_rss_mb, start_server  # bench/ is on sys.path when a script runs

from quorum.core.datasets import load_raw, resolve_data_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/demo")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--failure-rate", type=float, default=0.3, help="share of module runs that fail")
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--module-timeout-ms", type=float, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    token, port = secrets.token_hex(16), free_port()
    env = {
        "QUORUM_ADMIN_TOKEN": token,
        "QUORUM_BREAKER_FAILURES": "0",
        "QUORUM_MODULE_TIMEOUT_MS": str(args.module_timeout_ms),
    }
    proc = start_server(args.bundle, port, env)
    rate = args.failure_rate
    plan = {"fail_probability": rate * 0.5, "hang_probability": rate * 0.2, "nan_probability": rate * 0.3}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("PUT", "/admin/faults", json.dumps({**plan, "seed": args.seed}),
                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
    assert conn.getresponse().status == 200, "could not install the fault plan"

    images = load_raw(resolve_data_dir())["test"][0]
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()
    next_request = iter(range(args.requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            body = json.dumps({"inputs": [images[i % len(images)].tolist()]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/predict?budget={args.budget}", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                status, data = r.status, json.loads(r.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                with lock:
                    counts["lost"] += 1
                    problems.append(f"request {i}: no answer ({type(e).__name__}: {e})")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(ms)
                counts[f"{status // 100}xx"] += 1
                if status >= 500:
                    problems.append(f"request {i}: {status} {data.get('error')}")
                    continue
                if status != 200:
                    problems.append(f"request {i}: {status} {data.get('error')}")
                    continue
                m = data["modules"]
                broken = m["failed"] + m["injected"]
                for f in broken:
                    kinds[("injected " if f in m["injected"] else "real ") + f["kind"]] += 1
                counts["degraded"] += data["degraded"]
                if data["degraded"] != bool(broken):
                    problems.append(f"request {i}: degraded={data['degraded']} with {len(broken)} failed modules")
                if len(m["used"]) + len(broken) != m["requested"]:
                    problems.append(f"request {i}: {len(m['used'])} used + {len(broken)} failed != {m['requested']}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb(proc.pid)
    proc.terminate()
    proc.wait(30)

    answered = sum(v for k, v in counts.items() if k.endswith("xx"))
    evaluated = args.budget * counts["2xx"]
    failed_runs = sum(kinds.values())
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    result = {
        "requests": args.requests,
        "answered": answered,
        "lost": counts["lost"],
        "status": {k: v for k, v in counts.items() if k.endswith("xx")},
        "degraded": counts["degraded"],
        "module_failures": dict(kinds),
        "failed_share_of_module_runs": round(failed_runs / evaluated, 4) if evaluated else None,
        "throughput_rps": round(answered / seconds, 1),
        "p50_ms": round(q[49], 2),
        "p99_ms": round(q[98], 2),
        "problems": len(problems),
        "server_peak_rss_mib": round(peak, 1),
    }
    print(f"{args.requests} requests, {args.concurrency} clients, budget {args.budget}, fault plan {plan}, "
          f"module timeout {args.module_timeout_ms:g} ms, {seconds:.1f} s")  # fmt: skip
    for key, value in result.items():
        print(f"  {key:<28} {value}")
    for line in problems[:10]:
        print(f"  ! {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ok = not problems and counts["lost"] == 0 and answered == args.requests
    print("PASS: no 5xx, none lost, degraded exactly when modules failed" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
