"""Chaos with real faults: shard processes killed, restarted, stopped and continued under load.

    python bench/shard_chaos.py --bundle bundles/demo          # 4 shards, 16 clients, 10 s phases

Starts `quorum serve BUNDLE --shard i/4` for i = 1..4 and a `quorum gateway` over them, all on
loopback ports, then sends POST /predict (one real Fashion-MNIST test image each, the whole
ensemble: budget = every module) from --clients threads over keep-alive connections, through
five phases of --phase-s seconds:

  all up           the four shards answer
  2 killed         shard 2 gets SIGKILL: its socket resets, then refuses
  2 restarted      shard 2 starts again on the same port (the phase begins once it is ready)
  3 stopped        shard 3 gets SIGSTOP: it accepts connections and never answers
  3 continued      shard 3 gets SIGCONT

Per phase: answers, 5xx, other failures (refused or lost connections, other statuses), degraded
answers, the accuracy on the images sent, p50 and p99 latency and the modules used. And when the
gateway saw each change: from the signal (or the restarted shard's readiness) to the first
answer that shows it and to the gateway's health state (`quorum_shard_up`, polled every 50 ms).

Then, in this process, every module's logits on the whole test split give the accuracy the
outage should cost: the ensemble without shard 2's modules, checked against the accuracy
served on the same images during the outage, next to random removal of a quarter of the
modules (the robustness curve at 25 % removed). Exits 1 if any answer was a 5xx or lost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from _serve import free_port, start_gateway, start_shard, start_shards  # bench/ is on sys.path

from quorum.core.datasets import load_raw, resolve_data_dir

PHASES = ["all up", "2 killed", "2 restarted", "3 stopped", "3 continued"]


@dataclass
class Answer:
    at: float  # time.monotonic() when it came back
    phase: str  # the phase it came back in
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    image: int
    label: int = -1
    degraded: bool = False
    used: int = 0
    latency_ms: float = 0.0


@dataclass
class Load:
    """Client threads sending one test image per request to the gateway until stopped."""

    port: int
    images: np.ndarray
    budget: int
    clients: int
    phase: str = PHASES[0]
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            with self._lock:
                i, self._next = self._next % len(self.images), self._next + 1
            body = json.dumps({"inputs": [self.images[i].tolist()]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/predict?budget={self.budget}", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self.answers.append(Answer(time.monotonic(), self.phase, 0, i))
                continue
            answer = Answer(time.monotonic(), self.phase, r.status, i, latency_ms=(time.perf_counter() - t0) * 1e3)
            if r.status == 200:
                out = json.loads(data)
                answer.label = out["predictions"][0]["label"]
                answer.degraded, answer.used = out["degraded"], len(out["modules"]["used"])
            self.answers.append(answer)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


class Watcher(threading.Thread):
    """Polls the gateway's `quorum_shard_up` every 50 ms: when each shard went down and came back."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, threading.Event()
        self.changes: list[tuple[float, str, bool]] = []  # (when, shard URL, up)

    def run(self) -> None:
        last: dict[str, bool] = {}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                continue
            for url, value in re.findall(r'^quorum_shard_up\{shard="([^"]+)"\} ([\d.]+)$', text, re.M):
                up = float(value) == 1.0
                if last.get(url) != up:
                    last[url] = up
                    self.changes.append((time.monotonic(), url, up))
            time.sleep(0.05)

    def first(self, url: str, up: bool, after: float) -> float | None:
        return next((t - after for t, u, v in self.changes if u == url and v == up and t >= after), None)


def first_answer(answers: list[Answer], after: float, degraded: bool) -> float | None:
    return next((a.at - after for a in answers if a.at >= after and a.status == 200 and a.degraded == degraded), None)


def phase_table(answers: list[Answer], labels: np.ndarray, seconds: dict[str, float]) -> list[dict]:
    rows = []
    for phase in PHASES:
        mine = [a for a in answers if a.phase == phase]
        ok = [a for a in mine if a.status == 200]
        latency = np.array([a.latency_ms for a in ok]) if ok else np.array([np.nan])
        rows.append({
            "phase": phase,
            "answers": len(mine),
            "per_s": len(mine) / seconds[phase],
            "5xx": sum(a.status >= 500 for a in mine),
            "lost": sum(a.status == 0 or (a.status != 200 and a.status < 500) for a in mine),
            "degraded": sum(a.degraded for a in ok),
            "accuracy": float(np.mean([a.label == labels[a.image] for a in ok])) if ok else float("nan"),
            "modules": float(np.mean([a.used for a in ok])) if ok else float("nan"),
            "p50_ms": float(np.percentile(latency, 50)),
            "p99_ms": float(np.percentile(latency, 99)),
        })  # fmt: skip
    return rows


def references(bundle: str, images: np.ndarray, labels: np.ndarray, lost: list[int], outage: list[Answer]) -> dict:
    """What removing the lost shard's modules should cost, from every module's logits on the test split."""
    from quorum.experiments.robustness import SubsetScorer, bundle_module_logits
    from quorum.runtime.engine import Engine

    engine = Engine.load(bundle, device="cpu")
    try:
        m = engine.num_modules
        scorer = SubsetScorer(bundle_module_logits(engine, images, list(range(m)), progress=False), labels)
    finally:
        engine.close()
    rest = np.array(sorted(set(range(m)) - set(lost)))
    correct = scorer.correct([rest])[0]
    sent = np.array([a.image for a in outage if a.status == 200 and a.degraded], dtype=int)
    served = np.array([a.label == labels[a.image] for a in outage if a.status == 200 and a.degraded])
    random = scorer.random_removal(len(lost), trials=20, seed=0)
    return {
        "whole": float(scorer.accuracy([np.arange(m)])[0]),
        "without_lost_shard": float(correct.mean()),
        "random_removal": float(random.mean()),
        "random_removal_sd": float(random.std(ddof=1)),
        "removed": len(lost),
        "modules": m,
        "outage_images": len(sent),
        "outage_served": float(served.mean()) if len(sent) else float("nan"),
        "outage_expected": float(correct[sent].mean()) if len(sent) else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/demo")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--phase-s", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--budget", type=int, help="modules per request (default: all of them)")
    p.add_argument("--shard-timeout-ms", type=float, default=1000.0, help="the gateway's per-shard timeout")
    p.add_argument("--health-interval-s", type=float, default=0.5, help="the gateway's health-check interval")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if args.shards < 3:
        raise SystemExit("--shards: at least 3 (one is killed, another stopped)")

    images, labels = load_raw(resolve_data_dir())["test"]
    labels = np.asarray(labels, dtype=int)
    shards = start_shards(args.bundle, args.shards)
    ports = [port for _, port in shards]
    gateway_port = free_port()
    options = ["--shard-timeout-ms", str(args.shard_timeout_ms), "--health-interval-s", str(args.health_interval_s)]
    gateway = start_gateway(ports, gateway_port, *options)
    procs = [proc for proc, _ in shards]
    url = [f"http://127.0.0.1:{port}" for port in ports]
    with open(f"{args.bundle}/manifest.json") as f:
        m = len(json.load(f)["modules"])
    budget = args.budget or m
    lost = list(range(1 * m // args.shards, 2 * m // args.shards))  # shard 2's modules

    load = Load(gateway_port, images, budget, args.clients)
    watcher = Watcher(gateway_port)
    watcher.start()
    load.start()
    events: dict[str, float] = {}  # when each phase began
    print(f"{args.shards} shards of {args.bundle} ({m} modules), a gateway, {args.clients} clients, budget {budget}")
    try:
        for phase in PHASES:
            if phase == "2 restarted":  # the outage lasts until the new process is ready
                procs[1] = start_shard(args.bundle, 1, args.shards, ports[1])
            events[phase] = time.monotonic()
            load.phase = phase  # answers that come back from now on
            if phase == "2 killed":
                procs[1].kill()
                procs[1].wait()
            elif phase == "3 stopped":
                procs[2].send_signal(signal.SIGSTOP)
            elif phase == "3 continued":
                procs[2].send_signal(signal.SIGCONT)
            time.sleep(args.phase_s)
            print(f"  {phase:<12} done")
        events["end"] = time.monotonic()
    finally:
        load.close()
        watcher.stop.set()
        procs[2].send_signal(signal.SIGCONT)
        for proc in [*procs, gateway]:
            proc.terminate()
        for proc in [*procs, gateway]:
            proc.wait(30)

    seconds = {phase: events[after] - events[phase] for phase, after in zip(PHASES, [*PHASES[1:], "end"], strict=True)}
    rows = phase_table(load.answers, labels, seconds)
    detect = {
        "shard 2 gone (SIGKILL)": (
            first_answer(load.answers, events["2 killed"], True),
            watcher.first(url[1], False, events["2 killed"]),
        ),
        "shard 2 back (restart ready)": (
            first_answer(load.answers, events["2 restarted"], False),
            watcher.first(url[1], True, events["2 restarted"]),
        ),
        "shard 3 gone (SIGSTOP)": (
            first_answer(load.answers, events["3 stopped"], True),
            watcher.first(url[2], False, events["3 stopped"]),
        ),
        "shard 3 back (SIGCONT)": (
            first_answer(load.answers, events["3 continued"], False),
            watcher.first(url[2], True, events["3 continued"]),
        ),
    }
    outage = [a for a in load.answers if a.phase == "2 killed"]
    ref = references(args.bundle, images, labels, lost, outage)

    print("\n| phase | answers | answers/s | 5xx | lost | degraded | accuracy | modules used | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['phase']} | {r['answers']} | {r['per_s']:.0f} | {r['5xx']} | {r['lost']} | {r['degraded']} | "
            f"{r['accuracy']:.4f} | {r['modules']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    print("\n| change | first answer showing it | gateway health state |")
    print("| --- | ---: | ---: |")

    def ms(t: float | None) -> str:
        return "never" if t is None else f"{t * 1e3:.0f} ms"

    for name, (answer, health) in detect.items():
        print(f"| {name} | {ms(answer)} | {ms(health)} |")
    print(
        f"\nTest split ({len(labels)} images): whole ensemble {ref['whole']:.4f}; without shard 2's "
        f"{ref['removed']} modules {ref['without_lost_shard']:.4f}; random removal of {ref['removed']} of "
        f"{ref['modules']} (20 draws) {ref['random_removal']:.4f} ± {ref['random_removal_sd']:.4f}.\n"
        f"During the outage, on the {ref['outage_images']} images answered degraded: served "
        f"{ref['outage_served']:.4f}, the same modules offline {ref['outage_expected']:.4f}."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"phases": rows, "detection_s": detect, "reference": ref, "budget": budget}, f, indent=2)
    failed = sum(r["5xx"] + r["lost"] for r in rows)
    if failed:
        print(f"FAILED: {failed} answers were 5xx or lost")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
