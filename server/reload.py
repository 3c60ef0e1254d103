"""Hot reload: load a bundle beside the one being served and swap it in atomically.

Triggered by `POST /admin/reload` or by SIGHUP (`systemctl reload quorum`, `kill -HUP`), which
reloads the configured bundle. The new engine is loaded and verified off the event loop while
the old one keeps serving; a request holds the engine it started with, so requests in flight
finish on the old one. If the new bundle cannot be served, nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from quorum.runtime.engine import Engine
from quorum.runtime.errors import QuorumError
from quorum.server.deps import load_engine

__all__ = ["install_sighup", "swap_engine"]

log = logging.getLogger(__name__)

RETIRE_AFTER_S = 60  # an old engine is closed this long after the swap, when its requests are long done


async def swap_engine(app: FastAPI, bundle: Path) -> Engine:
    """Load `bundle` and serve it from now on. Raises QuorumError (nothing changed) if it cannot
    be served. Reloads run one at a time."""
    async with app.state.reload_lock:
        old: Engine | None = app.state.engine
        new = await run_in_threadpool(load_engine, app.state.settings.model_copy(update={"bundle": bundle}))
        new.faults = old.faults if old is not None else None  # a rehearsal in progress goes on
        app.state.engine = new  # one reference swap
        if old is not None:
            asyncio.get_running_loop().call_later(RETIRE_AFTER_S, old.close)
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
