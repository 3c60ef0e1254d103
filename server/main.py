"""Run the server with uvicorn: `quorum serve BUNDLE` calls `serve(settings)`."""

from __future__ import annotations

import uvicorn

from quorum.server.app import create_app, load_engine
from quorum.server.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings) -> None:
    """Load the bundle and serve until interrupted. Fails fast if the bundle cannot be served."""
    engine = load_engine(settings)  # errors surface before binding
    app = create_app(settings, engine=engine)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
