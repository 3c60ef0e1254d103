"""The gateway: the public API over shards, each a `quorum serve` of some of a bundle's modules.

    gateway = await Gateway.connect(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    prediction = await gateway.predict_async(images, PredictOptions(budget=32))

A request is planned as one server plans it (the anytime order or a specialist subset, less
the modules their shards report out of rotation; `budget`, `drop`, `seed`), then each shard is
asked, concurrently, for the sum of its planned modules' outputs; the sums are added and
divided by the modules used, and the task's head answers. The modules of a shard that is down,
refuses, resets, stalls past its timeout or answers garbage are failed (`shard_unreachable`,
`shard_timeout`, `shard_error`) and the answer is degraded: a lost shard costs its modules. If
no planned module answered, the next modules of the order on live shards answer instead, so
that the gateway answers while one shard is up. A shard's 4xx (inputs that overflow every module
it ran) costs the request those modules and leaves the shard in rotation; refused everywhere,
the request is a 422. A module on several shards (a replica) is asked of the first that is up,
and of the next within the same request if that one fails. The gateway runs no module itself: no
ONNX Runtime, no torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import httpx2 as httpx
import numpy as np

from quorum.runtime.adaptive import StageResult, Stages, adaptive_rule
from quorum.runtime.breaker import Breakers
from quorum.runtime.confidence import MemberSums
from quorum.runtime.errors import InvalidRequest, NoModulesAvailable
from quorum.runtime.heads import Head, nothing_answered, specialist_index
from quorum.runtime.manifest import AdaptiveRule, Manifest
from quorum.runtime.options import PredictOptions
from quorum.runtime.plan import Planner, RequestPlan
from quorum.runtime.preprocess import Preprocessor, as_array
from quorum.runtime.results import FailedModule, Partial, Prediction
from quorum.runtime.stats import ModuleState
from quorum.server.shards import Shard, ShardFailure

__all__ = ["Gateway"]

log = logging.getLogger(__name__)


class Gateway:
    """A bundle served by shards, with the attributes the server's routes read of an engine."""

    executor = "gateway"
    packed_note: str | None = None
    providers: list[str] = []  # noqa: RUF012 (no modules run here)
    faults = None  # fault plans are a shard's: send them there

    def __init__(self, manifest: Manifest, shards: Sequence[Shard], *, shard_timeout_s: float = 2.0):
        self.manifest = manifest
        self.shards = list(shards)
        self.shard_timeout_s = shard_timeout_s
        self.num_modules = len(manifest.modules)
        self.bundle_dir = f"{manifest.name} on {len(self.shards)} shards"
        self.preprocess = Preprocessor(manifest.input)
        self._head = Head(manifest)
        self._digest: str | None = next((s.digest for s in self.shards if s.digest), None)
        self._planner: Planner | None = None
        self._planned_at: tuple[int, ...] = ()
        self._routes: dict[int, list[Shard]] = {}
        self._routed_at: tuple[int, ...] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        urls: Sequence[str],
        *,
        shard_timeout_s: float = 2.0,
        wait_s: float = 60.0,
        coalesce_rows: int = 256,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    ) -> Gateway:
        """Reach the shards, read the bundle's manifest from the first that answers (waiting up to
        `wait_s` for one), and check that every shard that answers serves that bundle. `transports`:
        how to reach a URL other than over TCP (tests)."""
        shards = [Shard(url, coalesce_rows=coalesce_rows, transport=(transports or {}).get(url)) for url in urls]
        deadline = time.monotonic() + wait_s
        while True:
            await asyncio.gather(*(s.check(None) for s in shards))
            up = [s for s in shards if s.up]
            if up:
                break
            if time.monotonic() > deadline:
                reasons = "; ".join(f"{s.url}: {s.last_error}" for s in shards)
                raise NoModulesAvailable(f"no shard answers ({reasons})")
            await asyncio.sleep(0.5)
        manifest = Manifest.model_validate_json(await up[0].manifest())
        gateway = cls(manifest, shards, shard_timeout_s=shard_timeout_s)
        gateway._digest = up[0].digest
        await gateway.check()  # a shard of another bundle is down from the start
        return gateway

    # ---------------------------------------------------------------- health

    async def check(self) -> None:
        """Every shard's health and modules, at once."""
        await asyncio.gather(*(s.check(self._digest) for s in self.shards))

    def start_health_checks(self, interval_s: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.check()
                except Exception:  # pragma: no cover - a check never raises; keep checking anyway
                    log.exception("shard health check failed")

        self._task = asyncio.get_running_loop().create_task(loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(s.close() for s in self.shards))

    def close(self) -> None:
        """The HTTP clients are closed by `aclose`, in the app's lifespan."""

    # ---------------------------------------------------------------- what routes read

    def _servers(self, j: int) -> list[Shard]:
        """The shards that serve module j, the live ones that run it first."""
        version = tuple(s.version for s in self.shards)
        if version != self._routed_at:  # rebuilt only when a shard goes down or up, or its modules change
            self._routes = {
                m: [s for s in self.shards if s.up and m in s.in_rotation]
                + [s for s in self.shards if not s.up and m in s.states]
                for m in range(self.num_modules)
            }
            self._routed_at = version
        return self._routes[j]

    def _replica_up(self, j: int) -> bool:
        servers = self._servers(j)
        return bool(servers) and servers[0].up

    def _plannable(self) -> frozenset[int]:
        """Every module but those that live shards serve and keep out of rotation (quarantined, breaker
        open): as one server plans. A module whose shards are all down stays planned, and fails."""
        up = [s for s in self.shards if s.up]
        running = {j for s in up for j in s.in_rotation}
        held_back = {j for s in up for j in s.served if j not in running}
        return frozenset(j for j in range(self.num_modules) if j not in held_back)

    @property
    def healthy_ids(self) -> frozenset[int]:
        """Modules in rotation on a shard that is up."""
        return frozenset(j for s in self.shards if s.up for j in s.in_rotation)

    def in_rotation(self) -> list[int]:
        healthy = self.healthy_ids
        return [j for j in self.manifest.anytime_order if j in healthy]

    @property
    def modules(self) -> list[ModuleState]:
        states = []
        for e in self.manifest.modules:
            holders = [s for s in self.shards if e.id in s.states]
            live = next((s for s in holders if s.up), None)
            if live is None:
                where = holders[0].url if holders else None
                why = f"shard {where} is down: {holders[0].last_error}" if holders else "no shard serves it"
                states.append(ModuleState(e.id, e.file, "unreachable", reason=why, shard=where))
                continue
            _, status, breaker, calls, failures = live.states[e.id]
            states.append(
                ModuleState(e.id, e.file, status, calls=calls, failures=failures, breaker=breaker, shard=live.url)
            )
        return states

    def may_wait(self, faults: object = None) -> bool:
        return True

    # ---------------------------------------------------------------- answering

    def _plan(self) -> Planner:
        """The planner over `_plannable()`, rebuilt when a shard's state changes."""
        version = tuple(s.version for s in self.shards)
        if self._planner is None or version != self._planned_at:
            specialists = [s.modules for s in self.manifest.specialists]
            plannable = self._plannable()
            self._planner = Planner(self.manifest.anytime_order, specialists, plannable, Breakers(self.num_modules, 0))
            self._planned_at = version
        return self._planner

    async def predict_async(self, x_raw: Any, options: PredictOptions) -> Prediction:
        """The answer of the shards' modules (see the module docstring); InvalidRequest for a client's
        mistake, NoModulesAvailable when no shard answers."""
        t0 = time.perf_counter()
        if options.faults is not None:
            raise InvalidRequest("a gateway injects no faults: send fault plans to the shards")
        c = None if options.specialist is None else specialist_index(self.manifest, options.specialist)
        rule = adaptive_rule(self.manifest, options.tolerance) if options.adaptive else None
        x = as_array(x_raw)
        self.preprocess(x)  # a client's mistake is a 4xx here, once, not one from each shard
        budget = options.budget
        if options.adaptive and options.max_budget is not None:
            budget = min(options.max_budget, self.num_modules)  # a cap above M is no cap
        plan = self._plan().plan(c, budget, options.drop, options.seed)
        deadline = None if options.deadline_ms is None else t0 + options.deadline_ms / 1e3
        if rule is not None:
            return await self._predict_adaptive(x, plan, rule, deadline, t0, options.deadline_ms)
        parts, failed, refused = await self._ask_with_replicas(x, plan.selected, deadline)
        used = [j for p in parts for j in p.used]
        if not used and plan.selected and not refused:
            # every planned module's shard failed: the next modules of the order on live shards answer
            tried = set(plan.selected) | set(plan.dropped)
            order = self.manifest.anytime_order if c is None else self.manifest.specialists[c].modules
            spare = [j for j in order if j in self.healthy_ids and j not in tried][: len(plan.selected)]
            more, more_failed, refused = await self._ask(x, spare, deadline)
            parts, failed = parts + more, failed + more_failed
            used = [j for p in parts for j in p.used]
        unfinished = [j for p in parts for j in p.unfinished]
        failed += [f for p in parts for f in p.failed]
        if not used:
            if refused:
                raise InvalidRequest(refused[0].reason)
            raise nothing_answered(failed, unfinished, options.deadline_ms)
        total = np.add.reduce([p.sum for p in parts if p.used], dtype=np.float32)
        members = MemberSums.total([p.members for p in parts if p.used])
        rank = {j: i for i, j in enumerate(plan.selected)}
        used.sort(key=lambda j: rank.get(j, len(rank)))
        failed.sort(key=lambda f: rank.get(f.id, len(rank)))
        mean = np.asarray(total / np.float32(len(used)))
        return self._head.predict(mean, plan, used, failed, unfinished, t0, c, members)

    async def _predict_adaptive(
        self,
        x: np.ndarray,
        plan: RequestPlan,
        rule: AdaptiveRule,
        deadline: float | None,
        t0: float,
        deadline_ms: float | None,
    ) -> Prediction:
        """budget=auto as a server answers it (`adaptive.Stages`), each stage one fan-out to the shards
        that hold its modules, for the inputs not yet sure enough."""
        conf = self.manifest.confidence
        assert conf is not None
        n, k = x.shape[0], self.manifest.num_classes
        stages = Stages(plan.selected, conf, rule.thresholds, self._head.temperatures, n, k)
        rank = {j: i for i, j in enumerate(plan.selected)}
        refused: list[ShardFailure] = []
        while (step := stages.next()) is not None:
            chunk, rows = step
            if deadline is not None and time.perf_counter() >= deadline and stages.used:
                stages.unfinished += chunk
                stages.stop()
                break
            xs = x if len(rows) == n else x[rows]
            parts, failed, refusals = await self._ask_with_replicas(xs, chunk, deadline, stages.squares)
            refused += refusals
            answered = [p for p in parts if p.used]
            total = np.add.reduce([p.sum for p in answered], dtype=np.float32) if answered else np.zeros((len(rows), k))
            stages.record(
                StageResult(
                    total,
                    sorted((j for p in answered for j in p.used), key=rank.__getitem__),
                    failed + [f for p in parts for f in p.failed],
                    [j for p in parts for j in p.unfinished],
                    MemberSums.total([p.members for p in answered]),
                )
            )
        if not stages.used:
            if refused:
                raise InvalidRequest(refused[0].reason)
            raise nothing_answered(stages.failed, stages.unfinished, deadline_ms)
        stages.failed.sort(key=lambda f: rank.get(f.id, len(rank)))
        mean, counts = stages.answer()
        result = self._head.predict(
            mean, plan, stages.used, stages.failed, stages.unfinished, t0, None, stages.members, counts
        )
        result.degraded = bool(stages.failed or stages.unfinished) or len(plan.selected) < plan.requested
        return result

    async def _ask_with_replicas(
        self, x: np.ndarray, ids: list[int], deadline: float | None, squares: bool = False
    ) -> tuple[list[Partial], list[FailedModule], list[ShardFailure]]:
        """`_ask`, then, for the modules whose shard failed and is down now, a replica on another live shard."""
        parts, failed, refused = await self._ask(x, ids, deadline, squares)
        turned_away = {j for r in refused for j in r.ids}
        if again := [f.id for f in failed if f.id not in turned_away and self._replica_up(f.id)]:
            more, more_failed, more_refused = await self._ask(x, again, deadline, squares)
            parts, refused = parts + more, refused + more_refused
            failed = [f for f in failed if f.id not in set(again)] + more_failed
        return parts, failed, refused

    async def _ask(
        self, x: np.ndarray, ids: list[int], deadline: float | None, squares: bool = False
    ) -> tuple[list[Partial], list[FailedModule], list[ShardFailure]]:
        """Each live shard's partial answer for its share of `ids`, at once (`squares`: with the members'
        products); the modules no live shard holds, and those of shards that fail, as failures; and the
        shards' refusals of the inputs."""
        groups: dict[Shard, list[int]] = {}
        failed: list[FailedModule] = []
        for j in ids:
            servers = self._servers(j)
            if not servers:
                failed.append(FailedModule(j, "no live shard serves it", "shard_unreachable"))
            elif not servers[0].up:
                failed.append(
                    FailedModule(j, f"shard {servers[0].url} is down: {servers[0].last_error}", "shard_unreachable")
                )
            else:
                groups.setdefault(servers[0], []).append(j)
        if not groups:
            return [], failed, []
        remaining_ms = None if deadline is None else max(1.0, (deadline - time.perf_counter()) * 1e3)
        timeout_s = (
            self.shard_timeout_s if remaining_ms is None else min(self.shard_timeout_s, remaining_ms / 1e3 + 0.05)
        )
        width = self.manifest.num_classes
        answers = await asyncio.gather(
            *(shard.partial(x, group, width, remaining_ms, timeout_s, squares) for shard, group in groups.items()),
            return_exceptions=True,
        )
        parts, refused = [], []
        for (shard, group), answer in zip(groups.items(), answers, strict=True):
            if isinstance(answer, ShardFailure):
                failed += answer.failed(group)
                if answer.refused:
                    refused.append(replace(answer, ids=group))
            elif isinstance(answer, BaseException):
                log.exception("asking shard %s failed", shard.url, exc_info=answer)
                failed += ShardFailure("shard_error", f"shard {shard.url}: {type(answer).__name__}").failed(group)
            else:
                parts.append(answer)
        return parts, failed, refused
