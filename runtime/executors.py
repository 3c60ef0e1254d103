"""The isolated path: one session per module, run concurrently under deadlines.

`IsolatedExecutor` runs modules on a few workers that share one thread pool, each run under a
deadline. A module that raises, returns garbage or hangs fails alone: the others still
answer, and a hung run is told to terminate. (The packed path, any subset in one call, is
`quorum.runtime.packed`.) Executors only run graphs and report what happened; the engine
decides what a failure means.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort

from quorum.runtime.faults import FaultPlan, InjectedFault

__all__ = ["IsolatedExecutor", "ModuleRun", "RunKind", "default_workers", "fast_run"]


STALL_S = 0.01  # a request whose drains all made no progress this long gets another drain


def default_workers() -> int:
    """Concurrent module runs per request: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def fast_run(session: ort.InferenceSession) -> Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]:
    """`session.run` without the Python wrapper's per-call input checks (a quarter of a small
    graph's call): for feeds that the caller built and checked itself. The wrapper where the
    binding is not there."""
    binding = getattr(session, "_sess", None)
    if binding is None:  # pragma: no cover - another onnxruntime build
        return lambda outputs, feeds: session.run(outputs, feeds)
    return lambda outputs, feeds: binding.run(outputs, feeds, None)


# A run's outcome; one cut off by the request's deadline (shorter than the module timeout) did not fail.
RunKind = Literal["error", "timeout", "nonfinite", "deadline"]


@dataclass
class ModuleRun:
    """The outcome of one module's run: logits (N, K), or an error and its kind."""

    id: int
    logits: np.ndarray | None
    error: str | None
    ms: float
    kind: RunKind | None = None  # set with `error`
    injected: bool = False  # the error was put there by a fault plan


@dataclass
class _Run:
    """A module run in progress: how to stop it, and since when it runs."""

    options: ort.RunOptions
    start: float
    cancel: threading.Event  # ends an injected wait, as `options.terminate` ends a real run

    def stop(self) -> None:
        self.options.terminate = True  # the run stops at its next node and raises in its drain
        self.cancel.set()


class IsolatedExecutor:
    """One session per module; `workers` runs at a time on a shared pool; a deadline per request.

    Each request starts up to `workers` drains that take the next module from the request's
    list until it is empty; when none of them made progress for STALL_S while modules wait
    (runs that hang), another drain starts. A run past the module timeout is told to
    terminate (ONNX Runtime's RunOptions.terminate) and reported as timed out; at the
    request's deadline the runs still going are cut off the same way, and the request answers
    with what finished. The pool keeps spare threads, so a few hung runs cannot starve later
    requests.
    """

    def __init__(
        self,
        sessions: dict[int, ort.InferenceSession],
        input_name: str,
        output_name: str,
        *,
        workers: int | None = None,
        timeout_s: float = 1.0,
    ):
        self.sessions = sessions
        self.workers = workers or default_workers()
        self.timeout_s = timeout_s
        self._input, self._output = input_name, output_name
        # Threads waiting on a hung run cost no CPU; spares keep concurrent requests from queueing
        # behind hung runs (a queued module that misses its deadline is a timeout).
        self._pool = ThreadPoolExecutor(max_workers=max(1024, 8 * self.workers), thread_name_prefix="quorum-module")

    def run_one(
        self,
        j: int,
        x: np.ndarray,
        options: ort.RunOptions | None = None,
        faults: FaultPlan | None = None,
        cancel: threading.Event | None = None,
        waiting: set[int] | None = None,
    ) -> ModuleRun:
        """Run module j on the calling thread; `faults` may delay it, make it hang or raise, or
        corrupt its logits; `cancel` ends an injected wait; `waiting` holds j during one."""
        t0 = time.perf_counter()
        try:
            corrupt = faults is not None and faults.before_run(j, cancel or threading.Event(), waiting)
            logits = self.sessions[j].run([self._output], {self._input: x}, options)[0]
            if corrupt:
                return ModuleRun(j, np.full_like(logits, np.nan), None, (time.perf_counter() - t0) * 1e3, injected=True)
            return ModuleRun(j, logits, None, (time.perf_counter() - t0) * 1e3)
        except Exception as e:
            ms = (time.perf_counter() - t0) * 1e3
            return ModuleRun(j, None, f"{type(e).__name__}: {e}", ms, "error", injected=isinstance(e, InjectedFault))

    def run(
        self,
        ids: Sequence[int],
        x: np.ndarray,
        *,
        deadline_s: float | None = None,
        wait_first: bool = False,
        faults: FaultPlan | None = None,
    ) -> list[ModuleRun]:
        """Run modules `ids` on x; one ModuleRun per id, in the order of `ids`.

        Each run has the module timeout from its own start: past it, the run is told to
        terminate, reported as a timeout, and its drain moves on to the next module, so a
        module queued behind a hung one still gets its full time. The request ends when every
        module has answered or timed out, at `deadline_s` (runs cut off then are of kind
        "deadline": not failures), and at the latest at twice the module timeout (what is
        left then timed out). With `wait_first`, a deadline that passes before any module
        answered waits on for the first, within that limit.
        """
        ids = list(ids)
        results: dict[int, ModuleRun] = {}
        running: dict[int, _Run] = {}
        in_fault: set[int] = set()  # modules in an injected delay or hang
        lock = threading.Lock()
        queue = iter(ids)
        stop, first = threading.Event(), threading.Event()
        t0 = time.perf_counter()
        timeout_ms = self.timeout_s * 1e3

        def drain() -> None:
            while not stop.is_set():
                with lock:
                    j = next(queue, None)
                    if j is None:
                        return
                    run = running[j] = _Run(ort.RunOptions(), time.perf_counter(), threading.Event())
                    run.options.log_severity_level = 4  # a terminated run is reported here, not logged by ORT
                result = self.run_one(j, x, run.options, faults, run.cancel, in_fault)
                with lock:
                    running.pop(j, None)
                    if j not in results:  # else it was already reported as timed out
                        results[j] = result
                        if result.error is None:
                            first.set()

        limit = t0 + 2 * self.timeout_s
        end = min(limit, t0 + deadline_s) if deadline_s is not None else limit
        drains = [self._pool.submit(drain) for _ in range(min(self.workers, len(ids)))]
        answered, stalled_since = 0, t0
        while True:
            now = time.perf_counter()
            with lock:
                for j, run in running.items():
                    if j not in results and now - run.start >= self.timeout_s:
                        run.stop()  # the drain's run raises and is discarded; the drain goes on
                        why = f"timeout: no answer within {timeout_ms:g} ms"
                        results[j] = ModuleRun(j, None, why, timeout_ms, "timeout", injected=j in in_fault)
                live = [run.start for j, run in running.items() if j not in results]
                done, unstarted = len(results), len(ids) - len(results) - len(live)
            if done == len(ids) or now >= limit or (now >= end and not (wait_first and not first.is_set())):
                break
            if done > answered:
                answered, stalled_since = done, now
            elif unstarted and now - stalled_since >= STALL_S:
                # Every drain is stuck on a slow run while modules wait: one more drain, so that
                # a hung module costs its own answer only, not those queued behind it.
                drains.append(self._pool.submit(drain))
                stalled_since = now
            next_timeout = min(live, default=now) + self.timeout_s
            wait(
                drains, timeout=max(0.0, min(end, limit, next_timeout, now + STALL_S) - now), return_when=ALL_COMPLETED
            )
        cut = deadline_s is not None and now < limit  # the request's deadline, not the limit, ended it
        with lock:
            stop.set()
            for j in ids:
                if j in results:
                    continue
                if (going := running.get(j)) is not None:
                    going.stop()
                if cut:
                    results[j] = ModuleRun(j, None, "unfinished at the request's deadline", 0.0, "deadline")
                else:
                    why = f"timeout: no answer within the request's limit of {2 * timeout_ms:g} ms"
                    results[j] = ModuleRun(j, None, why, 0.0, "timeout", injected=j in in_fault)
        return [results[j] for j in ids]

    def probe(self, ids: Sequence[int], x: np.ndarray) -> list[ModuleRun]:
        """Run each module of `ids` on x once, as loading checks them; one ModuleRun per id, in order.

        One request for all of them ends at twice the module timeout, and on a busy machine the modules
        not started by then count as timed out, healthy or not; so those that timed out run once more,
        `workers` at a time, each within its own timeout."""
        runs = self.run(ids, x)
        again = [r.id for r in runs if r.kind == "timeout"]
        step = self.workers
        retried = {r.id: r for i in range(0, len(again), step) for r in self.run(again[i : i + step], x)}
        return [retried.get(r.id, r) for r in runs]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
