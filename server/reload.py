"""Hot reload: load a bundle beside the one being served and swap it in atomically.

Triggered by `POST /admin/reload` or by SIGHUP (`systemctl reload quorum`, `kill -HUP`), which
reloads the configured bundle. The new engine is loaded and verified off the event loop while
the old one keeps serving. A bundle with any module quarantined, or with fewer healthy modules
than the one serving, changes nothing unless the admin forces it (a half-copied bundle must
not replace a healthy one); a bundle that cannot be served at all changes nothing, ever.
Requests hold the engine they started with (`Leases`): the old engine is closed when its last
request ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from quorum.runtime.errors import QuorumError
from quorum.server.deps import load_engine

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine

__all__ = ["Leases", "ReloadRefused", "install_sighup", "swap_engine"]

log = logging.getLogger(__name__)


class ReloadRefused(QuorumError):
    """The new bundle loads, but would serve with less than the one serving now."""


class Leases:
    """Requests in flight per engine; a retired engine is closed when its last request ends.

    Used on the event loop's one thread only, so it needs no lock."""

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self._retired: dict[int, Engine] = {}

    @contextmanager
    def hold(self, engine: Engine) -> Iterator[None]:
        key = id(engine)
        self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
                if (retired := self._retired.pop(key, None)) is not None:
                    retired.close()

    def retire(self, engine: Engine) -> None:
        """Close `engine` now if no request holds it, else when the last one ends."""
        if id(engine) in self._held:
            self._retired[id(engine)] = engine
        else:
            engine.close()

    def in_flight(self, engine: Engine) -> int:
        return self._held.get(id(engine), 0)


def _shortfall(new: Engine, old: Engine | None) -> str | None:
    """Why `new` would serve with less than `old`; None when it would not."""
    quarantined = new.num_modules - len(new.healthy_ids)
    if quarantined:
        reasons = "; ".join(f"m{m.id}: {m.reason}" for m in new.modules if m.status == "quarantined")
        shown = reasons if len(reasons) <= 300 else reasons[:300] + "…"
        return f"{quarantined} of its {new.num_modules} modules are quarantined ({shown})"
    if old is not None and len(new.healthy_ids) < len(old.healthy_ids):
        return f"it has {len(new.healthy_ids)} healthy modules, fewer than the {len(old.healthy_ids)} serving now"
    return None


async def swap_engine(app: FastAPI, bundle: Path, *, force: bool = False) -> Engine:
    """Load `bundle` and serve it from now on. Raises QuorumError (nothing changed) if it cannot
    be served, and ReloadRefused if it would serve with less (unless `force`). One at a time."""
    async with app.state.reload_lock:
        old: Engine | None = app.state.engine
        new = await run_in_threadpool(load_engine, app.state.settings.model_copy(update={"bundle": bundle}))
        if not force and (why := _shortfall(new, old)) is not None:
            new.close()
            raise ReloadRefused(f"{bundle}: {why}; to serve it anyway, reload with force")
        new.faults = old.faults if old is not None else None  # a rehearsal in progress goes on
        app.state.engine = new  # one reference swap
        if old is not None:
            app.state.leases.retire(old)
        return new


def install_sighup(app: FastAPI) -> bool:
    """Reload the configured bundle on SIGHUP. False where signals cannot be handled here (not
    the main thread, as under a test client, or no SIGHUP on this platform)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        bundle = app.state.settings.bundle
        try:
            new = await swap_engine(app, bundle)
        except QuorumError as e:
            log.error("SIGHUP: reload refused, still serving the previous bundle: %s", e)
            return
        log.warning("SIGHUP: reloaded %s (%d healthy modules)", new.bundle_dir, len(new.healthy_ids))

    def on_sighup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return False
    return True
