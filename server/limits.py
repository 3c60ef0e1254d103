"""Limits as pure ASGI middleware, applied before anything is parsed.

- `InFlightLimit`: at most `max_in_flight` inference requests at once; beyond, a 503 with
  `Retry-After` at once (counted in the metrics), so that a burst cannot queue without bound.
- `BodySizeLimit`: a request body over `max_bytes` is a 413, by Content-Length or while streaming.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodySizeLimit", "InFlightLimit", "is_inference"]


def is_inference(scope: Scope) -> bool:
    """POST /predict, POST /v2/models/{name}/infer or POST /shard/partial."""
    path: str = scope.get("path", "")
    return scope.get("method") == "POST" and (
        path in ("/predict", "/shard/partial") or (path.startswith("/v2/models/") and path.endswith("/infer"))
    )


async def _answer(send: Send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class InFlightLimit:
    """Answer 503 with Retry-After when `max_in_flight` inference requests are already being handled."""

    def __init__(self, app: ASGIApp, max_in_flight: int, on_reject: Callable[[], None] = lambda: None):
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_inference(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:  # the event loop's one thread: no lock needed
            self._on_reject()
            await _answer(
                send,
                503,
                f"the server is handling its limit of {self.max_in_flight} inference requests; retry in a second",
                ((b"retry-after", b"1"),),
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodySizeLimit:
    """Answer 413 when a request body exceeds `max_bytes`, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        # Buffer the body (bounded), so a chunked body larger than the limit is refused too.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # disconnect: let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await _answer(send, 413, f"request body larger than the limit of {self.max_bytes} bytes")
