"""The runtime engine: a loaded bundle that answers budgeted predictions. Knows nothing of HTTP.

    engine = Engine.load("bundles/demo")
    result = engine.predict(x_raw, budget=32)   # x_raw: (N, 784) raw pixel values 0..255

Each request goes through the same steps, each in its own module: preprocessing
(`preprocess`), planning over the modules in rotation (`plan`), execution on the packed or
isolated path (`execute`), and the task's head (`heads`); `bundle` loads and verifies,
`stats` counts. A classification bundle answers class probabilities and labels; a regression
or count bundle answers values. A specialist query answers "is it class c?" from that class's
subset, on the same path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from quorum.runtime.adaptive import StageResult, Stages, adaptive_rule
from quorum.runtime.breaker import Breakers
from quorum.runtime.bundle import Executor, LoadedBundle, load_bundle
from quorum.runtime.errors import InvalidRequest, NoModulesAvailable
from quorum.runtime.execute import Runner
from quorum.runtime.faults import FaultPlan
from quorum.runtime.heads import Head, class_index, nothing_answered, specialist_index
from quorum.runtime.manifest import AdaptiveRule
from quorum.runtime.offline import module_logits
from quorum.runtime.options import DEFAULT, PredictOptions
from quorum.runtime.plan import Planner
from quorum.runtime.preprocess import Preprocessor
from quorum.runtime.results import FailedModule, Partial, Prediction, SpecialistAnswer
from quorum.runtime.stats import ModuleState, ModuleStats

__all__ = ["Engine", "FailedModule", "ModuleState", "Partial", "PredictOptions", "Prediction", "SpecialistAnswer"]


class Engine:
    """A loaded bundle, ready to answer budgeted predictions. Safe to call from many threads.

    `executor` says how modules run: "packed" (one call of the bundle's packed graph for any
    subset), "isolated" (one session per module, concurrent, each under a deadline), or
    "auto": packed when the bundle has a packed graph that verifies, else isolated.
    """

    def __init__(
        self,
        bundle: LoadedBundle,
        *,
        wait_for_first: bool = False,
        breaker: tuple[int, float, float] = (5, 30.0, 30.0),
        disagreement: bool = True,
    ):
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        self.bundle_dir = bundle.dir
        self.executor: Literal["packed", "isolated"] = "packed" if bundle.packed else "isolated"
        self.packed_note = bundle.packed_note  # why the packed graph is not used, if it is not
        self.providers = sorted({p for s in bundle.sessions.values() for p in s.get_providers()[:1]})
        self.healthy_ids = frozenset(bundle.sessions)
        self.faults: FaultPlan | None = None  # the server-wide fault plan (rehearsals), set by the admin API
        self.breakers = Breakers(len(m.modules), *breaker)
        self.preprocess = Preprocessor(m.input)
        self._head = Head(m)
        self._stats = ModuleStats(bundle.states)
        self._planner = Planner(m.anytime_order, [s.modules for s in m.specialists], self.healthy_ids, self.breakers)
        self._runner = Runner(
            bundle.packed,
            bundle.isolated,
            self._stats,
            self.breakers,
            m.num_classes,
            wait_for_first=wait_for_first,
            members=disagreement and m.task.task.has_classes,
        )

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        executor: Executor = "auto",
        workers: int | None = None,
        module_timeout_ms: float = 1000.0,
        packed_cache_mb: float = 64.0,
        packed_threads: int = 1,
        packed_compile: bool = True,
        wait_for_first: bool = False,
        breaker: tuple[int, float, float] = (5, 30.0, 30.0),
        modules: Collection[int] | None = None,
        disagreement: bool = True,
    ) -> Engine:
        """Verify and load a bundle. Raises BundleError only when no module is healthy, or when
        `executor="packed"` is asked for and the bundle's packed graph is missing or does not verify.

        Args:
            device: "auto" (CUDA where it loads), "cpu" or "cuda".
            executor: "auto", "packed" or "isolated" (see the class docstring).
            workers: concurrent module runs per request on the isolated path (default: cores).
            module_timeout_ms: the time one module run may take from its start (isolated path); a
                request ends by twice this.
            packed_cache_mb: memory for the gathered weights of subsets asked for again (budgets
                on the anytime order, specialists); 0 turns the cache off.
            packed_threads: intra-op threads of the packed session. 1 (the default) is fastest
                for small requests and never competes with the server's own thread; 2 halves the
                time of a 64-image, 256-module request on two cores (docs/RESULTS.md).
            packed_compile: compile a cached subset, on its second cached call, into a session
                with its weights as constants (in the background; needs the onnx package).
            wait_for_first: under `deadline_ms`, wait past the deadline for the first module
                (up to the module timeout) rather than answer that none finished.
            breaker: (failures, window_s, open_s): a module that fails `failures` times within
                `window_s` is out of rotation for `open_s`, then tried again (0 failures: off).
            modules: serve only these module ids (a shard of the bundle; default: all).
            disagreement: answers carry the modules' mutual information and vote share, which
                need each module's logits (on the packed path, a second output and a small
                product: docs/RESULTS.md measures the cost); off, only the entropy.
        """
        bundle = load_bundle(
            bundle_dir,
            device=device,
            executor=executor,
            workers=workers,
            module_timeout_ms=module_timeout_ms,
            packed_cache_mb=packed_cache_mb,
            packed_threads=packed_threads,
            packed_compile=packed_compile,
            modules=modules,
        )
        return cls(bundle, wait_for_first=wait_for_first, breaker=breaker, disagreement=disagreement)

    # ---------------------------------------------------------------- serving

    def predict(self, x_raw: Any, options: PredictOptions | None = None, /, **kwargs: Any) -> Prediction:
        """Predict with a budgeted subset of modules.

        `options` (or its fields as keywords: `budget`, `drop`, `seed`, `deadline_ms`,
        `specialist`, `faults`, `adaptive`, `tolerance`, `max_budget`) says which modules and how
        long; see `PredictOptions`. `budget="auto"` is `adaptive=True`: per input, the stages of
        the order until it is sure enough (`Prediction.per_input` says how many modules each used).
        `x_raw` are (N, *input.shape) raw inputs, as clients send them (0..255 pixels).
        Fewer modules available than the budget: all of them, `degraded`. None answered:
        NoModulesAvailable.
        """
        if kwargs:
            if options is not None:
                raise TypeError("give the options as a PredictOptions or as keywords, not both")
            if kwargs.get("budget") == "auto":  # as the server's query says it
                kwargs = {**kwargs, "budget": None, "adaptive": True}
            options = PredictOptions(**kwargs)
        elif options is None:
            options = DEFAULT
        t0 = time.perf_counter()
        c = None if options.specialist is None else self._specialist_index(options.specialist)
        rule = adaptive_rule(self.manifest, options.tolerance) if options.adaptive else None
        x = self.preprocess(x_raw)
        if self.bundle.trunk is not None:
            x = self._features(x)
        faults = (
            None if self.faults is None and options.faults is None else FaultPlan.merge(self.faults, options.faults)
        )
        if rule is not None:
            return self._predict_adaptive(x, options, rule, faults, t0)
        plan = self._planner.plan(c, options.budget, options.drop, options.seed, faults)
        deadline_s = None
        if options.deadline_ms is not None:
            deadline_s = max(0.0, options.deadline_ms / 1e3 - (time.perf_counter() - t0))
        try:
            packed = self._runner.packed is not None
            out = self._runner.combine(
                plan.selected,
                x,
                index=plan.index if packed else None,
                key=plan.key if packed and plan.cacheable else None,
                cacheable=plan.cacheable,
                deadline_s=deadline_s,
                faults=faults,
            )
        finally:
            if plan.trials:
                self._planner.release(plan)
        if not out.used:
            raise nothing_answered(out.failed, out.unfinished, options.deadline_ms)
        return self._head.predict(out.mean, plan, list(out.used), out.failed, out.unfinished, t0, c, out.members)

    def _predict_adaptive(
        self, x: np.ndarray, options: PredictOptions, rule: AdaptiveRule, faults: FaultPlan | None, t0: float
    ) -> Prediction:
        """budget=auto (`adaptive.Stages`): each stage of the plan's order runs, in one call on the
        packed path, on the inputs not yet sure enough. Under `deadline_ms`, a stage starts only
        while time is left, and the first only if nothing has answered yet."""
        conf = self.manifest.confidence
        assert conf is not None
        cap = None if options.max_budget is None else min(options.max_budget, self.num_modules)  # above M: no cap
        plan = self._planner.plan(None, cap, options.drop, options.seed, faults)
        n, k = x.shape[0], self.manifest.num_classes
        stages = Stages(plan.selected, conf, rule.thresholds, self._head.temperatures, n, k)
        try:
            while (step := stages.next()) is not None:
                chunk, rows = step
                deadline_s = None
                if options.deadline_ms is not None:
                    deadline_s = options.deadline_ms / 1e3 - (time.perf_counter() - t0)
                    if deadline_s <= 0 and stages.used:
                        stages.unfinished += chunk
                        stages.stop()
                        break
                    deadline_s = max(0.0, deadline_s)
                xs = x if len(rows) == n else x[rows]
                out = self._runner.combine(
                    chunk, xs, cacheable=plan.cacheable, deadline_s=deadline_s, faults=faults, squares=stages.squares
                )
                total = out.mean * np.float32(len(out.used)) if out.used else out.mean
                stages.record(StageResult(total, out.used, out.failed, out.unfinished, out.members))
        finally:
            if plan.trials:
                self._planner.release(plan)
        if not stages.used:
            raise nothing_answered(stages.failed, stages.unfinished, options.deadline_ms)
        mean, counts = stages.answer()
        result = self._head.predict(
            mean, plan, stages.used, stages.failed, stages.unfinished, t0, None, stages.members, counts
        )
        # fewer modules than the order holds is the point here; degraded means some did not answer
        result.degraded = bool(stages.failed or stages.unfinished) or len(plan.selected) < plan.requested
        return result

    def partial(
        self, x_raw: Any, ids: Sequence[int], *, deadline_ms: float | None = None, squares: bool = False
    ) -> Partial:
        """The sum of the outputs of the modules `ids` (N, K), for a gateway that combines shards.

        Each id this engine cannot run (another shard's, quarantined, or its breaker open) is
        failed as `unavailable`; the others run as in `predict`, failures and deadline included.
        `squares`: the members' sums include their products (a stage of budget=auto).
        """
        t0 = time.perf_counter()
        PredictOptions(deadline_ms=deadline_ms)  # checks it
        ids = list(ids)
        if bad := [j for j in ids if type(j) is not int or not 0 <= j < self.num_modules]:
            raise InvalidRequest(f"module ids {bad[:5]} are not modules of this bundle (0..{self.num_modules - 1})")
        if len(set(ids)) != len(ids):
            raise InvalidRequest("module ids must be distinct")
        x = self.preprocess(x_raw)
        if self.bundle.trunk is not None:
            x = self._features(x)
        rotation = set(self._planner.in_rotation())
        here = [j for j in ids if j in rotation]
        unavailable = [FailedModule(j, self._why_unavailable(j), "unavailable") for j in ids if j not in rotation]
        here, trials = self.breakers.claim(here) if self.breakers.any_half_open else (here, [])
        deadline_s = None if deadline_ms is None else max(0.0, deadline_ms / 1e3 - (time.perf_counter() - t0))
        try:
            out = (
                self._runner.combine(here, x, cacheable=True, deadline_s=deadline_s, squares=squares) if here else None
            )
        finally:
            if trials:
                self.breakers.release(trials)
        n, k = x.shape[0], self.manifest.num_classes
        members = None
        if out is None or not out.used:
            total = np.zeros((n, k), np.float32)
            used, failed, unfinished = [], list(out.failed) if out else [], list(out.unfinished) if out else []
        else:
            total = (out.mean * np.float32(len(out.used))).astype(np.float32, copy=False)
            used, failed, unfinished = list(out.used), list(out.failed), list(out.unfinished)
            members = out.members
        latency = (time.perf_counter() - t0) * 1e3
        return Partial(total, used, unavailable + failed, unfinished, latency, members)

    def _why_unavailable(self, j: int) -> str:
        state = self._stats.snapshot_one(j, self.breakers)
        if state.status == "elsewhere":
            return "not served here: another shard's module"
        if state.status == "quarantined":
            return f"quarantined: {state.reason}"
        return f"out of rotation: its breaker is {state.breaker.replace('_', '-')}"

    def predict_specialist(
        self, x_raw: Any, cls: int | str, options: PredictOptions | None = None, /, **kwargs: Any
    ) -> Prediction:
        """Answer "is it class `cls`?" (an index or a name, any case) with that class's specialist
        sub-ensemble: `predict` with `specialist=cls`. The subset's modules are used in the order
        they were selected, so `budget` and `drop` act on it as on the anytime order; positive when
        the subset's argmax is the class (`Prediction.specialist`)."""
        base = PredictOptions(**kwargs) if kwargs and options is None else options or DEFAULT
        return self.predict(x_raw, replace(base, specialist=cls))

    def _specialist_index(self, cls: int | str) -> int:
        return specialist_index(self.manifest, cls)

    def class_index(self, cls: int | str) -> int:
        """The index of class `cls`, given as an index or a name (case-insensitive)."""
        return class_index(self.manifest, cls)

    def may_wait(self, faults: FaultPlan | None = None) -> bool:
        """Whether a request can wait on module deadlines (isolated path, or faults injected),
        rather than finish in one bounded packed call."""
        return self._runner.packed is None or FaultPlan.merge(self.faults, faults) is not None

    def _features(self, x: np.ndarray) -> np.ndarray:
        """What the module graphs take: x itself, or the shared trunk's features of x."""
        trunk = self.bundle.trunk
        if trunk is None:
            return x
        try:
            features: np.ndarray = trunk.run(None, {self.manifest.input.name: x})[0]
        except Exception as e:
            raise NoModulesAvailable(f"the shared trunk failed, and every module needs it: {e}") from e
        if not np.isfinite(features).all():
            raise NoModulesAvailable("the shared trunk gave non-finite features, and every module needs them")
        return features

    # ---------------------------------------------------------------- state

    @property
    def modules(self) -> list[ModuleState]:
        """A snapshot of every module's state and counters, by id."""
        return self._stats.snapshot(self.breakers)

    def temperature(self, modules: int) -> float:
        """The temperature answers of `modules` modules are calibrated with (1: none fitted)."""
        return float(self._head.temperatures[min(max(modules, 0), self.num_modules)])

    @property
    def num_modules(self) -> int:
        return len(self.manifest.modules)

    def in_rotation(self) -> list[int]:
        """The anytime order without quarantined or open-breaker modules."""
        return self._planner.in_rotation()

    # ---------------------------------------------------------------- offline evaluation

    def module_logits(self, x_raw: Any, ids: list[int] | None = None, batch_size: int = 1000) -> np.ndarray:
        """Logits of each module in `ids` (default: every healthy module, by id): (N, len(ids), K).

        For offline evaluation (robustness curves, specialist selection), where every module's
        answer on a whole dataset is computed once and subsets are combined afterwards. Unlike
        `predict`, a module that fails here raises: an evaluation must not silently shrink.
        """
        m = self.manifest
        ids = sorted(self.healthy_ids) if ids is None else list(ids)
        x = self._features(self.preprocess(x_raw))
        return module_logits(self.bundle.sessions, x, ids, m.input.name, m.output.name, m.num_classes, batch_size)

    def mean_logits(self, x_raw: Any, ids: list[int]) -> np.ndarray:
        """Mean logits (N, K) of exactly the modules `ids`, through this engine's executor.

        For evaluating chosen subsets offline. Unlike `predict`, a module that is not healthy
        or that fails raises: an evaluation must not silently change its subset.
        """
        if not ids or (missing := [j for j in ids if j not in self.healthy_ids]):
            raise InvalidRequest(f"module(s) {ids and missing} are not healthy modules of this bundle")
        out = self._runner.combine(list(ids), self._features(self.preprocess(x_raw)))
        if out.failed:
            raise NoModulesAvailable("module(s) failed: " + "; ".join(f"m{f.id}: {f.reason}" for f in out.failed[:5]))
        return out.mean

    def close(self) -> None:
        """Release the worker threads of the isolated path and the packed path's compiler."""
        self.bundle.isolated.close()
        if self.bundle.packed is not None:
            self.bundle.packed.close()
