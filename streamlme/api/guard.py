"""The API checks a request before it reads it: the bearer token, then the body's size.

`RequestGuard` is a pure ASGI middleware in front of the whole app. A request without the
server's token is answered 401 before a byte of its body is read, and a body over
``[api] max_request_bytes`` is answered 413: at once when its ``Content-Length`` says so, or as
soon as a chunked body has sent more. Without it FastAPI parsed any body (30 MB of JSON took 2 s
of the event loop, during which ``/healthz`` waited too) before the token was looked at.

The health checks, the dashboard page and its static files need no token (`OPEN_PATHS`); the
size limit holds for every route.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "STREAMLME_API_TOKEN"
#: Paths any client may call: the probes, and the dashboard page and its files.
OPEN_PATHS = ("/healthz", "/readyz", "/")
OPEN_PREFIXES = ("/static/",)

UNAUTHORIZED = ("missing or wrong bearer token; send 'Authorization: Bearer <token>' with the "
                f"token of the server's [api] token or {TOKEN_ENV}")


def is_open(path: str) -> bool:
    """True for the routes that need no token."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class RequestGuard:
    """Answer 401 (no or wrong token) and 413 (body over ``max_bytes``) before the app reads."""

    def __init__(self, app: ASGIApp, token: str | None, max_bytes: int) -> None:
        self.app = app
        self.expected = token.encode() if token else None
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and not is_open(scope["path"]) \
                and not self._authorised(headers.get(b"authorization", b"")):
            await _answer(send, 401, "unauthorized", UNAUTHORIZED,
                          [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None:  # a number: the server refuses any other before the app runs
            if length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(send)
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        body = await self._read_at_most(receive)
        if body is None:
            await self._too_large(send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, credentials = header.partition(b" ")
        given = credentials.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(given, self.expected or b"")

    async def _read_at_most(self, receive: Receive) -> bytes | None:
        """The whole chunked body, or None as soon as it passes ``max_bytes``."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, send: Send) -> None:
        await _answer(send, 413, "too_large",
                      f"the request body is over {self.max_bytes} bytes, the server's "
                      "[api] max_request_bytes; send less (at most 1000 groups per "
                      "POST /v1/groups/effects)", [(b"connection", b"close")])


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` once, then whatever the server sends (a disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


async def _answer(send: Send, status: int, error: str, message: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": error, "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
