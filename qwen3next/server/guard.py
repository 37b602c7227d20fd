"""The server's ASGI guard: API key on /v1/*, request body size cap and request counting."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from .errors import error_body
from .metrics import Counter

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


async def _send_json(send: Callable, status: int, body: dict, extra_headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data, "more_body": False})



class GuardMiddleware:
    """Pure ASGI middleware: checks the API key on /v1/*, caps the body size (by Content-Length and by the bytes
    actually received; the body is read here and replayed to the app) and counts requests by endpoint/status."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, requests_total: Counter):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.requests_total = requests_total

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "499"  # no response started: the client went away first

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send)
        except BaseException:
            if status == "499":
                status = "500"
            raise
        finally:
            self.requests_total.inc(endpoint=_endpoint_label(scope["path"]), status=status)

    async def _guarded(self, scope, receive, send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                await _send_json(send, 401, error_body(401, "invalid or missing API key (send 'Authorization: "
                                                             "Bearer <key>')", code="invalid_api_key"),
                                 [(b"www-authenticate", b"Bearer")])
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is not None:
                if not length.strip().isdigit():
                    await _send_json(send, 400, error_body(400, f"invalid Content-Length header {length!r}"))
                    return
                if int(length) > self.max_body_bytes:  # answered at once, no drain: the body may never come
                    await self._too_large(receive, send, f"{int(length)} bytes", more=False)
                    return
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    await self._too_large(receive, send, f"more than {self.max_body_bytes} bytes", more)
                    return
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    async def _too_large(self, receive, send, size: str, more: bool = True) -> None:
        # Drain (a bounded amount of) the rest so that the client, still writing, gets to read the 413.
        drained = 0
        while more and drained < 4 * self.max_body_bytes + (1 << 20):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        msg = f"request body too large: {size}, the limit is {self.max_body_bytes} bytes"
        await _send_json(send, 413, error_body(413, msg, code="request_too_large"), [(b"connection", b"close")])


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notifications

    return replayed
