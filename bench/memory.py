"""The server's memory under its largest allowed requests, and its limits holding.

    python bench/memory.py --bundle bundles/demo

Starts `quorum serve` with the default limits (QUORUM_MAX_BODY_BYTES, QUORUM_MAX_ELEMENTS,
QUORUM_MAX_BATCH, QUORUM_MAX_IN_FLIGHT) and measures its resident memory (RSS, from /proc):

  idle        after start
  one         peak while answering one request of the largest allowed JSON body, alone
  burst       peak while `--concurrency` (default 32) such requests arrive at once

The largest allowed body is the longest JSON the limits accept: as many inputs as they allow,
every value written with 17 significant digits. The script also sends one
body over each limit (bytes, numbers) and `max_in_flight` + 8 slow requests at once, and
checks that those are refused fast with a 413 and a 503 with Retry-After.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

from _serve import free_port, peak_rss_mb, rss_mb, start_server  # bench/ is on sys.path when a script runs

from quorum.runtime.manifest import Manifest
from quorum.server.settings import Settings


def largest_body(shape: list[int], max_batch: int, max_elements: int, max_bytes: int) -> bytes:
    """The longest JSON body the limits let through: every value with 17 significant digits
    (a float64 in full), as many inputs as the batch, element and byte limits allow."""
    per_input = 1
    for d in shape:
        per_input *= d
    row = "[" + ",".join(["254.99999999999997"] * per_input) + "]"
    rows = min(max_batch, max_elements // per_input, (max_bytes - 16) // (len(row) + 1))
    return ('{"inputs": [' + ",".join([row] * rows) + "]}").encode()


def post(port: int, path: str, body: bytes, timeout: float = 120) -> tuple[int, dict[str, str], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status, dict(r.getheaders()), (time.perf_counter() - t0) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/demo")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    limits = Settings()  # the defaults
    shape = Manifest.load(args.bundle).input.shape
    body = largest_body(shape, limits.max_batch, limits.max_elements, limits.max_body_bytes)
    port = free_port()
    proc = start_server(args.bundle, port, {"QUORUM_ALLOW_FAULT_INJECTION": "true"})
    problems: list[str] = []
    try:
        idle = rss_mb(proc.pid)
        status, _, one_ms = post(port, "/predict?budget=32", body)
        if status != 200:
            problems.append(f"the largest allowed body got {status}")
        one = peak_rss_mb(proc.pid)

        statuses: list[int] = []
        lock = threading.Lock()

        def send() -> None:
            s, _, _ = post(port, "/predict?budget=32", body)
            with lock:
                statuses.append(s)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=send) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        burst_s = time.perf_counter() - t0
        burst = peak_rss_mb(proc.pid)
        if any(s != 200 for s in statuses):
            problems.append(f"burst statuses {sorted(set(statuses))}")

        over_bytes, _, _ = post(port, "/predict", b'{"inputs": [' + b" " * limits.max_body_bytes + b"]}")
        over_numbers, _, numbers_ms = post(
            port, "/predict", ('{"inputs": [[' + "0," * limits.max_elements + "0]]}").encode()
        )
        if over_bytes != 413 or over_numbers != 413:
            problems.append(f"over the limits: {over_bytes} (bytes), {over_numbers} (numbers); 413 expected")

        slow: list[tuple[int, dict[str, str], float]] = []

        def send_slow() -> None:
            answer = post(port, "/predict?budget=4&delay_ms=400", b'{"inputs": [[' + b"0," * 783 + b"0]]}")
            with lock:
                slow.append(answer)

        threads = [threading.Thread(target=send_slow) for _ in range(limits.max_in_flight + 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [a for a in slow if a[0] == 503]
        if not refused or any(a[1].get("retry-after") != "1" for a in refused):
            problems.append(f"beyond {limits.max_in_flight} in flight: {sorted({a[0] for a in slow})}")
        refused_ms = max((a[2] for a in refused), default=float("nan"))
    finally:
        proc.terminate()
        proc.wait(30)

    result = {
        "limits": {
            "max_body_bytes": limits.max_body_bytes,
            "max_elements": limits.max_elements,
            "max_batch": limits.max_batch,
            "max_in_flight": limits.max_in_flight,
        },
        "largest_body_bytes": len(body),
        "rss_idle_mib": round(idle, 1),
        "peak_rss_one_largest_mib": round(one, 1),
        "peak_rss_burst_mib": round(burst, 1),
        "per_request_mib": round((burst - idle) / args.concurrency, 1),
        "one_largest_ms": round(one_ms, 1),
        "burst_seconds": round(burst_s, 2),
        "over_numbers_refused_ms": round(numbers_ms, 1),
        "in_flight_refused": len(refused),
        "in_flight_slowest_refusal_ms": round(refused_ms, 1),
        "problems": problems,
    }
    print(
        f"quorum serve {args.bundle}, default limits; largest allowed body {len(body):,} bytes; "
        f"{args.concurrency} at once"
    )
    for key, value in result.items():
        print(f"  {key:<30} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("PASS" if not problems else "FAIL")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
