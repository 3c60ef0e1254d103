"""What the benchmark scripts share for running servers: a free port, `quorum serve` processes
(whole bundles or shards) and gateways ready to answer, its log's tail, and its memory."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

__all__ = [
    "free_port",
    "log_tail",
    "peak_rss_mb",
    "rss_mb",
    "start_gateway",
    "start_quorum",
    "start_server",
    "start_shard",
    "start_shards",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(log: IO[bytes], chars: int = 2000) -> str:
    """The end of a server's log file (servers log to a file: a full pipe would stall them)."""
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


def start_server(
    bundle: str, port: int, env: dict[str, str] | None = None, poll_s: float = 0.2
) -> subprocess.Popen[bytes]:
    """`quorum serve BUNDLE` on 127.0.0.1:port with QUORUM_* settings from `env`, once /readyz answers
    (asked every `poll_s` seconds)."""
    return start_quorum(["serve", bundle], port, env, poll_s)


def start_quorum(
    args: list[str], port: int, env: dict[str, str] | None = None, poll_s: float = 0.2
) -> subprocess.Popen[bytes]:
    """`quorum ARGS` (serve or gateway) on 127.0.0.1:port with QUORUM_* settings from `env`, once
    /readyz answers."""
    env = {**os.environ, "QUORUM_LOG_LEVEL": "error", **(env or {})}
    cmd = [sys.executable, "-m", "quorum", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the server runs: a full pipe would stall it)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"quorum {args[0]} exited: {log_tail(log)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(poll_s)
    proc.kill()
    raise SystemExit(f"quorum {args[0]} did not become ready in 120 s")


def start_shards(
    bundle: str, count: int, env: dict[str, str] | None = None
) -> list[tuple[subprocess.Popen[bytes], int]]:
    """`quorum serve BUNDLE --shard i/count` for every i, each on a free port: (process, port) each."""
    ports = [free_port() for _ in range(count)]
    return [(start_shard(bundle, i, count, port, env), port) for i, port in enumerate(ports)]


def start_shard(
    bundle: str, i: int, count: int, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Shard i (from 0) of `count` on `port`."""
    return start_quorum(["serve", bundle, "--shard", f"{i + 1}/{count}"], port, env)


def start_gateway(
    ports: list[int], port: int, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`quorum gateway` over the shards on `ports` of 127.0.0.1."""
    shards = [a for p in ports for a in ("--shard", f"http://127.0.0.1:{p}")]
    return start_quorum(["gateway", *shards, *options], port, env)


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"no {field} in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, in MiB (Linux)."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """The highest resident memory of a process so far (VmHWM), in MiB (Linux)."""
    return _status_kb(pid, "VmHWM") / 1024
