"""Real processes for the end-to-end tests: `quorum` commands on free loopback ports, and plain HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

__all__ = ["QUORUM", "free_port", "request", "start_quorum", "wait_ready"]

QUORUM = [sys.executable, "-m", "quorum"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
    """POST `body` (JSON) to `url`, or GET without one: the status and the JSON answer."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_ready(proc: subprocess.Popen[str], base: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if request(f"{base}/readyz", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{proc.args} did not become ready in {seconds:g} s")
        time.sleep(0.2)


def start_quorum(*args: str | Path, port: int | None = None, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`quorum ARGS --host 127.0.0.1 --port PORT` (a free one by default), once /readyz answers;
    QUORUM_* settings from `env`."""
    port = port or free_port()
    env = {**os.environ, "QUORUM_LOG_LEVEL": "warning", **env}
    cmd = [*QUORUM, *map(str, args), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base)
    return proc, base
