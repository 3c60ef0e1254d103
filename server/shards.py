"""A gateway's view of one shard: its health, the modules it serves, and partial answers over HTTP.

A shard is down from its first failed request or health check (refused, reset, stalled past
its timeout, answering garbage or a 5xx) until a health check finds it answering again: a
breaker that one health check closes. A 4xx is the request's, not the shard's: the shard
stays up (inputs that overflow every module of a shard are refused there, and only there).
Requests reuse keep-alive connections.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import get_args

import httpx2 as httpx
import numpy as np

from quorum.runtime.breaker import BreakerState
from quorum.runtime.results import FailedModule, FailureKind, Partial
from quorum.runtime.stats import ModuleStatus
from quorum.server import shard_codec

__all__ = ["Shard", "ShardFailure"]

log = logging.getLogger(__name__)
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request to a shard is noise


REFUSED = frozenset({400, 413, 422})  # what a shard answers to inputs it will not run


def _error(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


ModuleRow = tuple[int, ModuleStatus, BreakerState, int, int]
_STATUSES: frozenset[str] = frozenset(get_args(ModuleStatus))
_BREAKERS: frozenset[str] = frozenset(get_args(BreakerState))


def _module_row(row: object) -> ModuleRow:
    """One module's state as a shard's /shard/info lists it; ValueError if it is not one."""
    if not (isinstance(row, list) and len(row) == 5 and all(type(row[i]) is int for i in (0, 3, 4))):
        raise ValueError(f"a malformed module state: {str(row)[:100]}")
    if row[1] not in _STATUSES or row[2] not in _BREAKERS:
        raise ValueError(f"a malformed module state: {str(row)[:100]}")
    return row[0], row[1], row[2], row[3], row[4]


@dataclass
class ShardFailure(Exception):
    """A shard gave no usable answer: its modules of the request failed with this kind and reason."""

    kind: FailureKind
    reason: str
    refused: bool = False  # the shard refused these inputs (a 4xx): the request's fault, not the shard's
    ids: list[int] = field(default_factory=list)  # the modules it cost, where that is known

    def failed(self, ids: list[int]) -> list[FailedModule]:
        return [FailedModule(j, self.reason, self.kind) for j in ids]


class _Batch:
    """Requests that wait to go to a shard together: their inputs, and the answer they share."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.rows = 0
        self.done: asyncio.Future[Partial | ShardFailure | None] = asyncio.get_running_loop().create_future()

    def add(self, x: np.ndarray) -> int:
        """Add inputs x; the row of the sums where their answer begins."""
        self.inputs.append(x)
        self.rows += len(x)
        return self.rows - len(x)


class Shard:
    """One shard's URL, state and HTTP client; used from the gateway's event loop only."""

    def __init__(
        self,
        url: str,
        *,
        health_timeout_s: float = 1.0,
        coalesce_rows: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """`coalesce_rows`: the most inputs in one coalesced call (0: no coalescing); `transport`:
        how to reach the shard (default: HTTP over TCP; tests pass an app's own)."""
        self.url = url.rstrip("/")
        self.coalesce_rows = coalesce_rows
        self.max_elements = 262_144  # the most numbers one partial request may hold, as the shard says
        self._in_flight: set[tuple[object, ...]] = set()  # keys with a call on its way
        self._waiting: dict[tuple[object, ...], _Batch] = {}  # key -> the requests for the next call
        self._tasks: set[asyncio.Task[None]] = set()
        self.client = httpx.AsyncClient(
            base_url=self.url,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            timeout=health_timeout_s,
            transport=transport,
        )
        self.health_timeout_s = health_timeout_s
        self.up = False
        self.digest: str | None = None
        self.served: list[int] = []  # module ids it loads
        self.in_rotation: set[int] = set()  # of those, the ones it runs now (healthy, breaker not open)
        self.states: dict[int, ModuleRow] = {}  # id -> (id, status, breaker, calls, failures)
        self.changed_at = time.monotonic()  # when `up` last changed
        self.last_error: str | None = None
        self.version = 0  # changes whenever `up`, the modules served or those in rotation change

    def _set_up(self, up: bool, why: str | None = None) -> None:
        if up != self.up:
            self.up, self.changed_at = up, time.monotonic()
            self.version += 1
            (log.info if up else log.warning)(
                "shard %s is %s%s", self.url, "up" if up else "down", f": {why}" if why else ""
            )
        if why is not None:
            self.last_error = why

    async def check(self, digest: str | None) -> None:
        """Ask the shard for its state; down if it does not answer, or serves another bundle than `digest`."""
        try:
            r = await asyncio.wait_for(self.client.get("/shard/info"), self.health_timeout_s)
            r.raise_for_status()
            info = r.json()
            if digest is not None and info.get("digest") != digest:
                self._set_up(False, f"serves another bundle (digest {str(info.get('digest'))[:12]}…)")
                return
            self.digest = info["digest"]
            states = {row[0]: row for row in map(_module_row, info["modules"])}
            in_rotation = {int(j) for j in info["in_rotation"]}
            if in_rotation != self.in_rotation or states.keys() != self.states.keys():
                self.version += 1
            self.states, self.served, self.in_rotation = states, sorted(states), in_rotation
            self.max_elements = int(info.get("max_elements", self.max_elements))
        except (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError) as e:
            self._set_up(False, f"health check: {type(e).__name__}: {str(e)[:200]}")
            return
        self._set_up(True)

    async def manifest(self) -> str:
        r = await self.client.get("/shard/manifest", timeout=max(self.health_timeout_s, 5.0))
        r.raise_for_status()
        return r.text

    async def partial(
        self,
        x: np.ndarray,
        ids: list[int],
        width: int,
        deadline_ms: float | None,
        timeout_s: float,
        squares: bool = False,
    ) -> Partial:
        """The shard's partial answer for modules `ids` on raw inputs x; ShardFailure, and the shard
        marked down, when it gives none.

        Requests without a deadline for the same modules are coalesced (unless `coalesce_rows` is
        0): while one call for them is in flight, the others wait and go together in the next
        call, up to `coalesce_rows` inputs (and the numbers the shard takes in one request), and
        each gets its rows of the sums. A coalesced call
        that a shard refuses, or in which a module returns non-finite values, is sent again one
        request at a time, so that no request's inputs change another's answer. `squares`: the members'
        products too (a stage of budget=auto)."""
        key = (tuple(ids), x.shape[1:], x.dtype.str, squares)
        most = min(self.coalesce_rows, self.max_elements // max(1, math.prod(x.shape[1:])))  # rows in one call
        if deadline_ms is not None or len(x) >= most:
            return await self._call(x, ids, width, deadline_ms, timeout_s, squares)
        if key not in self._in_flight:
            self._in_flight.add(key)
            try:
                return await self._call(x, ids, width, None, timeout_s, squares)
            finally:
                self._next_call(key, ids, width, timeout_s, squares)
        batch = self._waiting.get(key)
        if batch is None:
            batch = self._waiting[key] = _Batch()
        elif batch.rows + len(x) > most:  # the next call is full: this one goes alone
            return await self._call(x, ids, width, None, timeout_s, squares)
        offset = batch.add(x)
        try:  # within timeout_s of this request's arrival; cancelled, it leaves the call to the others
            answer = await asyncio.wait_for(asyncio.shield(batch.done), timeout_s)
        except TimeoutError:
            raise ShardFailure(
                "shard_timeout", f"shard {self.url}: no answer within {timeout_s * 1e3:.0f} ms"
            ) from None
        if isinstance(answer, ShardFailure):
            raise answer
        if answer is None:  # sent again alone
            return await self._call(x, ids, width, None, timeout_s, squares)
        members = None if answer.members is None else answer.members.rows(offset, offset + len(x))
        return Partial(
            answer.sum[offset : offset + len(x)],
            answer.used,
            answer.failed,
            answer.unfinished,
            answer.latency_ms,
            members,
        )

    def _next_call(self, key: tuple[object, ...], ids: list[int], width: int, timeout_s: float, squares: bool) -> None:
        """The call for `key` is done: send the requests that waited for it, or free the key."""
        batch = self._waiting.pop(key, None)
        if batch is None:
            self._in_flight.discard(key)
            return
        task = asyncio.get_running_loop().create_task(self._send(key, batch, ids, width, timeout_s, squares))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, key: tuple[object, ...], batch: _Batch, ids: list[int], width: int, timeout_s: float, squares: bool
    ) -> None:
        try:
            x = batch.inputs[0] if len(batch.inputs) == 1 else np.concatenate(batch.inputs)
            answer: Partial | ShardFailure | None
            try:
                if not self.up:  # the call they waited for found it down
                    raise ShardFailure("shard_unreachable", f"shard {self.url} is down: {self.last_error}")
                answer = await self._call(x, ids, width, None, timeout_s, squares)
            except ShardFailure as e:
                answer = e
            if len(batch.inputs) > 1 and (
                (isinstance(answer, ShardFailure) and answer.refused)
                or (isinstance(answer, Partial) and any(f.kind == "nonfinite" for f in answer.failed))
            ):
                answer = None  # one request's inputs may be the cause: each goes again alone
            batch.done.set_result(answer)
        except BaseException as e:  # the waiters must hear of it
            if not batch.done.done():
                batch.done.set_result(ShardFailure("shard_error", f"shard {self.url}: {type(e).__name__}"))
            raise
        finally:
            self._next_call(key, ids, width, timeout_s, squares)

    async def _call(
        self, x: np.ndarray, ids: list[int], width: int, deadline_ms: float | None, timeout_s: float, squares: bool
    ) -> Partial:
        body, headers = shard_codec.encode_request(x, ids, deadline_ms, squares)
        try:
            # the whole exchange within timeout_s: httpx's own timeouts bound each read, not a trickle
            r = await asyncio.wait_for(self.client.post("/shard/partial", content=body, headers=headers), timeout_s)
        except (httpx.TimeoutException, TimeoutError) as e:
            raise self._down(
                "shard_timeout", f"no answer within {timeout_s * 1e3:.0f} ms ({type(e).__name__})"
            ) from None
        except httpx.TransportError as e:
            raise self._down("shard_unreachable", f"{type(e).__name__}: {str(e)[:200]}") from None
        if r.status_code in REFUSED:  # the shard is fine: it stays up
            raise ShardFailure("shard_error", f"shard {self.url} refused the inputs: {_error(r)}", refused=True)
        if r.status_code != 200:
            raise self._down("shard_error", f"HTTP {r.status_code}: {r.text[:200]}")
        try:
            return shard_codec.decode_partial(
                r.content, r.headers.get(shard_codec.HEADER_LENGTH), len(x), width, set(ids)
            )
        except ValueError as e:
            raise self._down("shard_error", f"a malformed answer: {str(e)[:200]}") from None

    def _down(self, kind: FailureKind, reason: str) -> ShardFailure:
        self._set_up(False, reason)
        return ShardFailure(kind, f"shard {self.url}: {reason}")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.client.aclose()
