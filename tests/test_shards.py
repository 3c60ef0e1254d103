"""Sharded serving with real processes: two `quorum serve --shard i/2` and a `quorum gateway` on
loopback ports, a `quorum serve` of the whole bundle to compare with, and real SIGKILL and
SIGSTOP of a shard while clients send."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.processes import free_port, request, start_quorum

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODULES = 40  # tests/bundles.py's synthetic bundle
SHARD_2 = set(range(20, 40))  # what `--shard 2/2` serves of 40 modules


class Cluster:
    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.ports = [free_port(), free_port()]
        self.shards = [self.start_shard(k) for k in range(2)]
        urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.gateway, self.base = start_quorum(
            "gateway", *(a for u in urls for a in ("--shard", u)), "--shard-timeout-ms", "1000",
            "--health-interval-s", "0.2",
        )  # fmt: skip
        self.single, self.single_base = start_quorum("serve", bundle)

    def start_shard(self, k: int) -> subprocess.Popen[str]:
        return start_quorum("serve", self.bundle, "--shard", f"{k + 1}/2", port=self.ports[k])[0]

    def close(self) -> None:
        for proc in [*self.shards, self.gateway, self.single]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(bundle_dir: Path) -> Iterator[Cluster]:
    c = Cluster(bundle_dir)
    yield c
    c.close()


def _predict(base: str, x: np.ndarray, query: str = "", timeout: float = 30) -> tuple[int, dict]:
    return request(f"{base}/predict{query}", json.dumps({"inputs": x.tolist()}).encode(), timeout=timeout)


@pytest.mark.parametrize("query", ["?budget=32", "?budget=32&drop=0.3&seed=7", "", "?specialist=Sneaker&budget=8"])
def test_the_gateway_answers_as_one_server_of_the_whole_bundle(cluster: Cluster, test_images, query: str):
    x = test_images[0][:16]
    status, mine = _predict(cluster.base, x, query)
    assert status == 200, mine
    status, want = _predict(cluster.single_base, x, query)
    assert status == 200, want
    assert mine["modules"] == want["modules"] and mine["degraded"] == want["degraded"]
    assert not mine["modules"]["failed"]
    key = "probability" if "specialist" in query else "probabilities"  # a specialist answers yes or no
    got = np.array([p[key] for p in mine["predictions"]])
    expected = np.array([p[key] for p in want["predictions"]])
    assert np.abs(got - expected).max() <= 1e-5
    assert mine.get("specialist") == want.get("specialist")


def test_modules_lists_each_modules_shard(cluster: Cluster):
    status, body = request(f"{cluster.base}/modules")
    assert status == 200 and body["healthy"] == MODULES
    shards = {m["id"]: m["shard"] for m in body["modules"]}
    assert len(set(shards.values())) == 2
    assert {j for j, s in shards.items() if s.endswith(str(cluster.ports[1]))} == SHARD_2


class Load:
    """`clients` threads sending the full-ensemble request until stopped; each answer with the
    time it came back."""

    def __init__(self, base: str, x: np.ndarray, clients: int = 4) -> None:
        self.url, self.body = f"{base}/predict", json.dumps({"inputs": x.tolist()}).encode()
        self.answers: list[tuple[float, int, dict]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.send) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def send(self) -> None:
        while not self.stop.is_set():
            status, body = request(self.url, self.body)
            self.answers.append((time.monotonic(), status, body))

    def since(self, t: float) -> list[tuple[int, dict]]:
        return [(s, b) for at, s, b in list(self.answers) if at > t]

    def wait_for(self, full: bool, seconds: float = 30) -> float:
        """When an answer came back that is full (or degraded) again."""
        t0 = time.monotonic()
        while time.monotonic() < t0 + seconds:
            for at, status, body in list(self.answers):
                if at > t0 and status == 200 and body["degraded"] != full:
                    return at
            time.sleep(0.05)
        pytest.fail(f"no {'full' if full else 'degraded'} answer in {seconds:g} s")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _outage_answers_name_the_lost_modules(answers: list[tuple[int, dict]], kinds: set[str]) -> int:
    """Every answer is a 200 and either full or missing exactly the second shard's modules, each
    listed as failed with a shard's kind; the number of degraded answers."""
    degraded = 0
    for status, body in answers:
        assert status == 200, body
        used, failed = set(body["modules"]["used"]), body["modules"]["failed"]
        if body["degraded"]:
            degraded += 1
            assert used == set(range(MODULES)) - SHARD_2, sorted(used)
            assert {f["id"] for f in failed} == SHARD_2
            assert {f["kind"] for f in failed} <= kinds, failed[:3]
        else:
            assert used == set(range(MODULES)) and not failed
    return degraded


def test_a_shard_killed_mid_load_costs_its_modules_and_no_request(cluster: Cluster, test_images):
    x, y = test_images[0][:8], test_images[1][:8]
    load = Load(cluster.base, x)
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.shards[1].kill()  # SIGKILL: no goodbye, the socket resets
        cluster.shards[1].wait(timeout=10)
        load.wait_for(full=False)
        time.sleep(1.5)
        cluster.shards[1] = cluster.start_shard(1)
        restarted_at = time.monotonic()
        back = load.wait_for(full=True)
        time.sleep(0.5)
    finally:
        load.close()
    outage = [(s, b) for at, s, b in load.answers if killed_at < at < restarted_at]
    assert _outage_answers_name_the_lost_modules(outage, {"shard_unreachable", "shard_error"}) >= 1
    assert _outage_answers_name_the_lost_modules(load.since(back), set()) == 0  # full again, every one
    accuracy = np.mean([[p["label"] == int(t) for p, t in zip(b["predictions"], y, strict=True)] for _, b in outage])
    assert accuracy >= 0.5, accuracy  # half an ensemble still classifies


def test_a_stopped_shard_times_out_and_comes_back(cluster: Cluster, test_images):
    x = test_images[0][:8]
    load = Load(cluster.base, x, clients=2)
    try:
        time.sleep(0.5)
        stopped_at = time.monotonic()
        cluster.shards[1].send_signal(signal.SIGSTOP)  # accepts connections, never answers
        load.wait_for(full=False)
        time.sleep(1.5)
        cluster.shards[1].send_signal(signal.SIGCONT)
        continued_at = time.monotonic()
        back = load.wait_for(full=True)
        time.sleep(0.5)
    finally:
        cluster.shards[1].send_signal(signal.SIGCONT)
        load.close()
    stalled = [(s, b) for at, s, b in load.answers if stopped_at < at < continued_at]
    assert _outage_answers_name_the_lost_modules(stalled, {"shard_timeout", "shard_unreachable"}) >= 1
    assert all(b["latency_ms"] < 1000 + 500 for _, b in stalled)  # the shard timeout bounds every answer
    assert _outage_answers_name_the_lost_modules(load.since(back), set()) == 0
