"""A gateway over shards against one server of the whole bundle, side by side.

    apt-get install -y wrk            # the load generator (Debian's package)
    python bench/shard_load.py --bundle bundles/demo

Starts, on loopback ports, one `quorum serve BUNDLE` and, apart from it, `quorum serve BUNDLE
--shard i/4` for i = 1..4 with two `quorum gateway`s over them: one as it ships, one that sends
every request to the shards on its own (`--coalesce-rows 0`). Then wrk loads each with
--connections connections for --seconds, POST /predict with one real Fashion-MNIST test image,
at each budget, in alternating rounds; each figure is the median over rounds. Every process
shares this machine's cores: on one host the gateway buys nothing but costs a hop and a fan-out,
so this measures that cost; on several devices the shards' work runs in parallel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import orjson
from _serve import free_port, start_gateway, start_server, start_shards  # bench/ is on sys.path
from http_load import wrk

from quorum.core.datasets import load_raw, resolve_data_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/demo")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--budgets", default="32,256", help="comma-separated budgets")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    image = load_raw(resolve_data_dir())["test"][0][:1]
    body = orjson.dumps({"inputs": image.tolist()})
    headers = {"Content-Type": "application/json"}
    budgets = [int(b) for b in args.budgets.split(",")]
    env = {"QUORUM_MAX_BATCH": "64"}

    single_port = free_port()
    procs = [start_server(args.bundle, single_port, env)]
    shards = start_shards(args.bundle, args.shards, env)
    procs += [proc for proc, _ in shards]
    urls = {"one server": f"http://127.0.0.1:{single_port}"}
    for name, options in ((f"gateway + {args.shards} shards", []), ("without coalescing", ["--coalesce-rows", "0"])):
        port = free_port()
        procs.append(start_gateway([p for _, p in shards], port, *options))
        urls[name] = f"http://127.0.0.1:{port}"
    samples: dict[tuple[str, int], list[dict]] = {(name, b): [] for b in budgets for name in urls}
    print(f"wrk -t2 -c{args.connections} -d{args.seconds}s, {args.rounds} alternating rounds, bundle {args.bundle}\n")
    try:
        for r in range(args.rounds):
            for b in budgets:
                for name, url in urls.items():
                    res = wrk(url, f"/predict?budget={b}", body, headers, args.seconds, args.connections)
                    samples[name, b].append(res)
                    print(
                        f"  round {r + 1} budget {b:<4} {name:<20} {res['rps']:8.0f} req/s  p50 {res['p50_ms']:7.2f} ms"
                        f"  p99 {res['p99_ms']:7.2f} ms  non-2xx {res['non_2xx']} {res['socket_errors']}"
                    )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)

    result = {
        f"{name}, budget {b}": {
            k: statistics.median(s[k] for s in runs) for k in ("rps", "p50_ms", "p99_ms", "non_2xx")
        }
        for (name, b), runs in samples.items()
    }
    single = next(iter(urls))
    print("\n| budget | server | req/s | p50 ms | p99 ms | non-2xx | req/s vs one server |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for b in budgets:
        base = result[f"{single}, budget {b}"]["rps"]
        for name in urls:
            row = result[f"{name}, budget {b}"]
            print(
                f"| {b} | {name} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                f"{row['non_2xx']:.0f} | {row['rps'] / base:.2f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(row["non_2xx"] == 0 for row in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
