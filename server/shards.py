"""A gateway's view of one shard: its health, the modules it serves, and partial answers over HTTP.

A shard is down from its first failed request or health check (refused, reset, stalled past
its timeout, answering garbage) until a health check finds it answering again; its modules
are out of the gateway's plans meanwhile. Requests reuse keep-alive connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx2 as httpx
import numpy as np

from quorum.runtime.results import FailedModule, FailureKind, Partial
from quorum.server import shard_codec

__all__ = ["Shard", "ShardFailure"]

log = logging.getLogger(__name__)
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request to a shard is noise


@dataclass
class ShardFailure(Exception):
    """A shard gave no usable answer: its modules of the request failed with this kind and reason."""

    kind: FailureKind
    reason: str

    def failed(self, ids: list[int]) -> list[FailedModule]:
        return [FailedModule(j, self.reason, self.kind) for j in ids]


class Shard:
    """One shard's URL, state and HTTP client; used from the gateway's event loop only."""

    def __init__(self, url: str, *, health_timeout_s: float = 1.0, transport: httpx.AsyncBaseTransport | None = None):
        """`transport`: how to reach the shard (default: HTTP over TCP; tests pass an app's own)."""
        self.url = url.rstrip("/")
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
        self.states: dict[int, list[object]] = {}  # id -> [id, status, breaker, calls, failures]
        self.changed_at = time.monotonic()  # when `up` last changed
        self.last_error: str | None = None
        self.version = 0  # changes whenever `up` or the modules in rotation may have changed

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
            self.states = {int(s[0]): s for s in info["modules"]}
            self.served = sorted(self.states)
            in_rotation = {int(j) for j in info["in_rotation"]}
            if in_rotation != self.in_rotation:
                self.in_rotation, self.version = in_rotation, self.version + 1
        except (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError) as e:
            self._set_up(False, f"health check: {type(e).__name__}: {str(e)[:200]}")
            return
        self._set_up(True)

    async def manifest(self) -> str:
        r = await self.client.get("/shard/manifest", timeout=max(self.health_timeout_s, 5.0))
        r.raise_for_status()
        return r.text

    async def partial(
        self, x: np.ndarray, ids: list[int], width: int, deadline_ms: float | None, timeout_s: float
    ) -> Partial:
        """The shard's partial answer for modules `ids` on raw inputs x; ShardFailure, and the shard
        marked down, when it gives none."""
        body, headers = shard_codec.encode_request(x, ids, deadline_ms)
        try:
            # the whole exchange within timeout_s: httpx's own timeouts bound each read, not a trickle
            r = await asyncio.wait_for(self.client.post("/shard/partial", content=body, headers=headers), timeout_s)
        except (httpx.TimeoutException, TimeoutError) as e:
            raise self._down(
                "shard_timeout", f"no answer within {timeout_s * 1e3:.0f} ms ({type(e).__name__})"
            ) from None
        except httpx.TransportError as e:
            raise self._down("shard_unreachable", f"{type(e).__name__}: {str(e)[:200]}") from None
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
        await self.client.aclose()
