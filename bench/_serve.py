"""What the benchmark scripts share for running servers: a free port and a server log's tail."""

from __future__ import annotations

import socket
from typing import IO

__all__ = ["free_port", "log_tail"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(log: IO[bytes], chars: int = 2000) -> str:
    """The end of a server's log file (servers log to a file: a full pipe would stall them)."""
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]
