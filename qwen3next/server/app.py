"""OpenAI-compatible HTTP server over `LLM`: chat and legacy completions (streamed as SSE or not), tool calls,
models, health and Prometheus metrics.

The engine runs in its own thread. Each engine request gets a helper thread that submits it (`LLM.submit` waits
for the engine lock) and forwards its blocking event stream into an asyncio.Queue, so the event loop never waits
on the engine. A client that goes away mid-request has its engine request aborted at once, freeing its cache.

Tool calls use the Qwen/Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`). Decoding is
not constrained, so `tool_choice` "required" or a named function is enforced by writing the start of a call
after the generation prompt (`<tool_call>\\n{"name": "` or `<tool_call>\\n{"name": "NAME", "arguments":`) and
parsing the completion as if the model had written that prefix. A call whose JSON is malformed comes back as
text content.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import functools
import hmac
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.llm import LLM, RequestHandle
from ..engine.memory import fmt_bytes
from ..engine.output import StreamEvent
from ..engine.sampling import GREEDY_TEMPERATURE_BELOW, SamplingParams
from ..tokenizer import ChatTemplateError, Tokenizer
from ..tool_calls import TOOL_CALL_START, ContentEvent, StreamingToolCallParser, ToolCallEvent, parse_tool_calls
from . import protocol as P
from .args import DEFAULT_MAX_BODY_BYTES, add_serve_args  # noqa: F401  (re-exported)
from .metrics import CONTENT_TYPE, Counter, Histogram, render_family

logger = logging.getLogger("qwen3next.server")

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


# ---- errors ----------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = P.ErrorInfo(message=message, type=_error_type(status), param=param, code=code)
    return P.ErrorResponse(error=info).model_dump()


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)


def _unencodable_field(value: Any, path: str = "") -> str | None:
    """The path (`messages[1].content`) of the first string in a parsed request that is not valid Unicode text (a lone
    UTF-16 surrogate such as "\ud800", which JSON can spell but no tokenizer can encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        bad = _unencodable_field(v, sub)
        if bad is not None:
            return bad
    return None


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_path(loc: tuple | list) -> str | None:
    """`messages[0].role` from a pydantic error location; union-branch tags ('str', 'list[int]', class names)
    are not fields and are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TYPE_TAGS:
            out += ("." if out else "") + part
    return out or None


def _validation_response(errors: list[dict]) -> JSONResponse:
    if not errors:
        return _error_response(400, "invalid request")
    # A union field reports one error per branch; a validator's own message (value_error) says the most.
    e = next((x for x in errors if x.get("type") == "value_error"), errors[0])
    kind = e.get("type", "")
    loc = list(e.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error")
        return _error_response(400, "malformed JSON in the request body" + (f": {detail}" if detail else ""),
                               code="invalid_json")
    param = _param_path(loc)
    if param is None:
        if kind == "missing":
            return _error_response(400, "a JSON request body is required")
        return _error_response(400, f"the request body must be a JSON object ({e.get('msg', '')})")
    msg = e.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return _error_response(400, f"{param}: {msg}", param=param)


def _leading_name(message: str) -> str | None:
    m = re.match(r"([a-z_]+)\b", message)
    return m.group(1) if m else None


# ---- ASGI guard: auth, body size, request counting ---------------------------------------------------------------


def _endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


async def _send_json(send: Callable, status: int, body: dict, extra_headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def named_call_prefix(name: str) -> str:
    """The forced start of a call to `name` (`tool_choice` naming a function). It stops right after `"arguments":`
    with no space: byte-level BPE tokenizes a call's `": {"` as `":` + ` {"`, so a prefix ending in a space would end
    in a token the model never produces there (the demo model then derailed in 20 of 20 samples at T=1)."""
    return TOOL_CALL_START + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments":'


class _GuardMiddleware:
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
                await _send_json(send, 401, _error_body(401, "invalid or missing API key (send 'Authorization: "
                                                             "Bearer <key>')", code="invalid_api_key"),
                                 [(b"www-authenticate", b"Bearer")])
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is not None:
                if not length.strip().isdigit():
                    await _send_json(send, 400, _error_body(400, f"invalid Content-Length header {length!r}"))
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
        await _send_json(send, 413, _error_body(413, msg, code="request_too_large"), [(b"connection", b"close")])


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notifications

    return replayed


# ---- token text for logprobs -----------------------------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map, inverted: printable bytes stand for themselves, the others are
    shifted to U+0100 onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    kept = set(printable)
    for k, b in enumerate(b for b in range(256) if b not in kept):
        table[chr(256 + k)] = b
    return table


class _TokenText:
    """Text and UTF-8 bytes of single tokens. A byte-level token may hold part of a character: its bytes are
    exact and its text is then written as 'bytes:\\xe2\\x80' (like vLLM)."""

    _TABLE = _byte_level_table()

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        self._byte_level = isinstance(tokenizer.backend.decoder, tokenizers.decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        if token_id in self._added:
            raw = self._added[token_id].encode()
        else:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                raw = b""
            elif self._byte_level and all(c in self._TABLE for c in piece):
                raw = bytes(self._TABLE[c] for c in piece)
            else:
                raw = self._tok.decode([token_id]).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = hit = (text, list(raw))
        return hit


class _TextOffsets:
    """Character offset of each token in a completion's text; a character split over several byte-level tokens
    counts once it is complete, and skipped special tokens add nothing."""

    def __init__(self, start: int, skipped: set[int]):
        self.chars = start
        self._skipped = skipped
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_id: int, raw: list[int]) -> int:
        at = self.chars
        if token_id not in self._skipped:
            self.chars += len(self._decoder.decode(bytes(raw)))
        return at


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


# ---- engine bridge ---------------------------------------------------------------------------------------------


class _Generation:
    """The engine requests of one API call (one per prompt), with their events bridged into the event loop."""

    def __init__(self, llm: LLM, request_id: str, jobs: list[tuple[list[int], SamplingParams]]):
        self._llm = llm
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._jobs = [(f"{request_id}-{i}" if len(jobs) > 1 else request_id, ids, sp) for i, (ids, sp) in
                      enumerate(jobs)]
        self._handles: list[RequestHandle | None] = [None] * len(jobs)
        self._lock = threading.Lock()
        self._aborted = False
        self._backlog: list[tuple] = []
        self._running = 0

    def _post(self, item: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _pump(self, i: int, request_id: str, ids: list[int], params: SamplingParams) -> None:
        try:
            handle = self._llm.submit(ids, params, request_id)
        except Exception as e:  # ValueError: rejected input; RuntimeError: the engine stopped
            self._post(("error", i, e))
            return
        with self._lock:
            self._handles[i] = handle
            aborted = self._aborted
        if aborted:
            handle.abort()
        self._post(("started", i, None))
        for ev in handle.events():
            self._post(("event", i, (ev, time.perf_counter())))
        self._post(("done", i, None))

    async def start(self) -> None:
        """Submit every request; if one is rejected, abort the others and raise its error."""
        for i, job in enumerate(self._jobs):
            threading.Thread(target=self._pump, args=(i, *job), name=f"qwen3next-{job[0]}", daemon=True).start()
        error: Exception | None = None
        try:
            for _ in self._jobs:
                while True:
                    item = await self._queue.get()
                    if item[0] in ("started", "error"):
                        break
                    self._backlog.append(item)  # an early request already streams while others are submitted
                if item[0] == "started":
                    self._running += 1
                elif error is None:
                    error = item[2]
        except BaseException:  # cancelled (server shutting down): nobody will read these requests
            self.abort()
            raise
        if error is not None:
            self.abort()
            raise error

    async def events(self) -> AsyncIterator[tuple[int, StreamEvent, float]]:
        """(prompt index, event, perf_counter time it left the engine) until every request has finished."""
        while self._running:
            kind, i, payload = self._backlog.pop(0) if self._backlog else await self._queue.get()
            if kind == "done":
                self._running -= 1
            elif kind == "event":
                yield i, payload[0], payload[1]

    def num_cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache, summed over the finished requests (the usage's
        prompt_tokens_details.cached_tokens)."""
        return sum(h.result().num_cached_tokens for h in self._handles if h is not None and h.done)

    def abort(self) -> None:
        """Abort the unfinished requests without blocking the caller (`LLM.abort` waits for the engine lock)."""
        with self._lock:
            self._aborted = True
            live = [h for h in self._handles if h is not None and not h.done]
        if live:
            threading.Thread(target=lambda: [h.abort() for h in live], name="qwen3next-abort", daemon=True).start()


async def _abort_on_disconnect(request: Request, gen: _Generation) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.abort()
            return


class _SSEResponse(StreamingResponse):
    """A server-sent-event stream that runs `on_close` however it ends (normally, client gone, cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class _Sample:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # sample 0 of a request that asked (echo with logprobs)


@dataclass
class _ToolSetup:
    tools: list[dict] | None = None  # what the chat template sees
    parse: bool = False  # parse <tool_call> blocks out of the output
    prefix: str = ""  # forced start of a call, appended after the generation prompt


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> P.Usage:
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached_tokens))


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- the server ------------------------------------------------------------------------------------------------


class OpenAIServer:
    """Request handling behind the routes of `create_app`."""

    def __init__(self, llm: LLM, served_model_name: str):
        self.llm = llm
        self.model_name = served_model_name
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.created = int(time.time())
        self.token_text = _TokenText(llm.tokenizer)
        self.special_ids = llm.tokenizer.special_token_ids
        self.requests_total = Counter("qwen3next_requests_total", "HTTP requests by endpoint and status code.",
                                      ("endpoint", "status"))
        self.ttft = Histogram("qwen3next_time_to_first_token_seconds",
                              "Time from receiving a request to its first generated token.", _TTFT_BUCKETS)
        self.itl = Histogram("qwen3next_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a sequence.", _ITL_BUCKETS)
        self.e2e = Histogram("qwen3next_e2e_request_latency_seconds",
                             "Time from receiving a generation request to its last token.", _E2E_BUCKETS)

    # -- helpers ------------------------------------------------------------------------------------------------

    async def _blocking(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    @staticmethod
    def _check_common(req: P.SamplingRequest) -> None:
        bad = _unencodable_field(req.model_dump(exclude_none=True))
        if bad is not None:
            raise APIError(400, f"{bad}: not valid Unicode text (a lone UTF-16 surrogate such as \\ud800); send "
                                f"well-formed UTF-8", bad)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")

    def _budget(self, prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
        """max_tokens for a prompt: the requested value if it fits in the context, else a 400 naming both sizes;
        without a request, all the room the context leaves."""
        limit = self.max_model_len
        what = "messages" if prompt_param == "messages" else "prompt"
        if requested == 0 and prompt_len <= limit:
            return 0  # the prompt alone (echo): it only has to fit
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt ({what}) "
                                f"has {prompt_len} tokens, which leaves no room for a completion. Please shorten the "
                                f"{what}.", prompt_param, "context_length_exceeded")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
                                f"completion). Please reduce the length of the {what} or of the completion "
                                f"({param}).", param, "context_length_exceeded")
        return requested

    @staticmethod
    def _sampling(req: P.SamplingRequest, max_tokens: int, logprobs: int | None, renames: dict[str, str],
                  prompt_logprobs: int | None = None) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value

        temperature = pick(req.temperature, 1.0)
        if temperature < GREEDY_TEMPERATURE_BELOW:
            temperature = 0.0  # logits / ~0 overflow to NaN probabilities; such a temperature means greedy anyway
        try:
            return SamplingParams(
                n=req.n, temperature=temperature, top_p=pick(req.top_p, 1.0), top_k=pick(req.top_k, -1),
                min_p=pick(req.min_p, 0.0), repetition_penalty=pick(req.repetition_penalty, 1.0),
                presence_penalty=pick(req.presence_penalty, 0.0), frequency_penalty=pick(req.frequency_penalty, 0.0),
                seed=req.seed, max_tokens=max_tokens, stop=req.stop, stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens)
        except ValueError as e:
            name = _leading_name(str(e))
            raise APIError(400, str(e), renames.get(name, name)) from None

    async def _start(self, gen: _Generation, prompt_param: str) -> None:
        try:
            await gen.start()
        except ValueError as e:
            name = _leading_name(str(e))
            raise APIError(400, str(e), prompt_param if name == "prompt" else None) from None
        except RuntimeError as e:
            raise APIError(503, f"the engine is not available: {e}", code="engine_unavailable") from None

    def _observe(self, t0: float, first: dict, last: dict, i: int, ev: StreamEvent, t: float) -> None:
        """TTFT per prompt (from request arrival) and inter-token latency per sample."""
        if not ev.token_ids:
            return
        if i not in first:
            first[i] = t
            self.ttft.observe(max(0.0, t - t0))
        prev = last.get((i, ev.index))
        if prev is not None:
            per_token = max(0.0, t - prev) / len(ev.token_ids)
            for _ in ev.token_ids:
                self.itl.observe(per_token)
        last[(i, ev.index)] = t

    async def _collect(self, gen: _Generation, request: Request, num_prompts: int, n: int, t0: float
                       ) -> list[list[_Sample]]:
        samples = [[_Sample() for _ in range(n)] for _ in range(num_prompts)]
        watcher = asyncio.ensure_future(_abort_on_disconnect(request, gen))
        first: dict = {}
        last: dict = {}
        try:
            async for i, ev, t in gen.events():
                self._observe(t0, first, last, i, ev, t)
                s = samples[i][ev.index]
                s.text += ev.text
                s.token_ids += ev.token_ids
                s.logprobs += ev.logprobs or []
                if ev.prompt_logprobs is not None:
                    s.prompt_logprobs = ev.prompt_logprobs
                if ev.finish_reason is not None:
                    s.finish_reason = ev.finish_reason
        finally:
            watcher.cancel()
            gen.abort()  # a no-op once everything finished
        self.e2e.observe(time.perf_counter() - t0)
        if any(s.finish_reason == "abort" for row in samples for s in row) and not await request.is_disconnected():
            raise APIError(500, "the request was aborted by the engine (it may have failed; see the server log)",
                           code="engine_error")
        return samples

    def _stream_response(self, gen: _Generation, request: Request, body: AsyncIterator[str]) -> _SSEResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for data in body:
                    if await request.is_disconnected():
                        return
                    yield data
            finally:
                gen.abort()

        return _SSEResponse(guarded(), gen.abort)

    def _chat_logprobs(self, entries: list[dict]) -> list[P.TokenLogprob]:
        out = []
        for e in entries:
            text, raw = self.token_text(e["token_id"])
            tops = []
            for tid, lp in e.get("top", []):
                ttext, traw = self.token_text(tid)
                tops.append(P.TopLogprob(token=ttext, logprob=_finite(lp), bytes=traw))
            out.append(P.TokenLogprob(token=text, logprob=_finite(e["logprob"]), bytes=raw, top_logprobs=tops))
        return out

    def _offsets(self, start: int, req: P.SamplingRequest) -> _TextOffsets:
        return _TextOffsets(start, self.special_ids if req.skip_special_tokens else set())

    def _completion_logprobs(self, entries: list[dict], offsets: _TextOffsets) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for e in entries:
            text, raw = self.token_text(e["token_id"])
            top = {text: _finite(e["logprob"])}  # OpenAI: the sampled token is always among them
            for tid, v in e.get("top", []):
                top.setdefault(self.token_text(tid)[0], _finite(v))
            lp.tokens.append(text)
            lp.token_logprobs.append(_finite(e["logprob"]))
            lp.top_logprobs.append(top)
            lp.text_offset.append(offsets.advance(e["token_id"], raw))
        return lp

    def _echo_logprobs(self, ids: list[int], prompt_logprobs: list) -> P.CompletionLogprobs:
        """The echoed prompt's part of legacy completions logprobs: each prompt token with its logprob given the
        tokens before it (null for the first) and its top alternatives, offsets from the start of the text.
        A request aborted mid-prefill has logprobs for a prefix of the prompt only: the rest of its tokens are
        echoed with null logprobs, never dropped."""
        assert len(prompt_logprobs) <= len(ids), (len(prompt_logprobs), len(ids))
        entries = [*prompt_logprobs, *[None] * (len(ids) - len(prompt_logprobs))]
        lp = P.CompletionLogprobs()
        offsets = _TextOffsets(0, set())
        for token, entry in zip(ids, entries, strict=True):
            text, raw = self.token_text(token)
            lp.tokens.append(text)
            lp.text_offset.append(offsets.advance(token, raw))
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(_finite(entry[token].logprob))
            top: dict[str, float] = {}
            for tid, v in entry.items():  # the prompt token first, then the top N
                top.setdefault(self.token_text(tid)[0], _finite(v.logprob))
            lp.top_logprobs.append(top)
        return lp

    # -- chat ---------------------------------------------------------------------------------------------------

    def _tool_setup(self, req: P.ChatCompletionRequest) -> _ToolSetup:
        names = [t.function.name for t in req.tools or []]
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if names else "none")
        if not names:
            if choice in ("required",) or isinstance(choice, P.NamedToolChoice):
                raise APIError(400, "tool_choice requires tools", "tool_choice")
            return _ToolSetup()
        if choice == "none":
            return _ToolSetup()
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        if choice == "auto":
            return _ToolSetup(tools, True)
        if choice == "required":
            return _ToolSetup(tools, True, TOOL_CALL_START + '\n{"name": "')
        name = choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools ({names})",
                           "tool_choice")
        return _ToolSetup(tools, True, named_call_prefix(name))

    @staticmethod
    def _template_messages(req: P.ChatCompletionRequest) -> list[dict]:
        out = []
        for k, m in enumerate(req.messages):
            text = m.text()
            if text is None and not (m.role == "assistant" and m.tool_calls):
                raise APIError(400, f"messages[{k}].content: required for role '{m.role}'", f"messages[{k}].content")
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": text}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id or _call_id(), "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            out.append(d)
        return out

    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        self._check_model(req.model)
        self._check_common(req)
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format type {req.response_format.type!r} is not supported (only 'text')",
                           "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        setup = self._tool_setup(req)
        messages = self._template_messages(req)
        try:
            text = await self._blocking(self.tokenizer.apply_chat_template, messages, tools=setup.tools,
                                        add_generation_prompt=True)
        except ChatTemplateError as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        ids = await self._blocking(self.tokenizer.encode, text + setup.prefix)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._budget(len(ids), requested, max_param, "messages")
        params = self._sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                {"logprobs": "top_logprobs", "max_tokens": max_param})
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = _Generation(self.llm, rid, [(ids, params)])
        await self._start(gen, "messages")
        if req.stream:
            return self._stream_response(gen, request, self._chat_stream(gen, req, rid, len(ids), setup, t0))
        samples = (await self._collect(gen, request, 1, req.n, t0))[0]
        choices = []
        for k, s in enumerate(samples):
            content: str | None = s.text
            calls: list[P.ToolCall] = []
            if setup.parse:
                content, parsed = parse_tool_calls(setup.prefix + s.text)
                calls = [P.ToolCall(id=_call_id(), function=P.FunctionCall(
                    name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))) for c in parsed]
                if not req.parallel_tool_calls:
                    calls = calls[:1]
                if calls and not content:
                    content = None
            choices.append(P.ChatChoice(
                index=k, message=P.AssistantMessage(content=content, tool_calls=calls),
                logprobs=P.ChoiceLogprobs(content=self._chat_logprobs(s.logprobs)) if req.logprobs else None,
                finish_reason="tool_calls" if calls else s.finish_reason))
        usage = _usage(len(ids), sum(len(s.token_ids) for s in samples), gen.num_cached_tokens())
        return JSONResponse(P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                                     usage=usage).model_dump())

    async def _chat_stream(self, gen: _Generation, req: P.ChatCompletionRequest, rid: str, prompt_len: int,
                           setup: _ToolSetup, t0: float) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> str:
            c = P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            return _sse(c.model_dump())

        n = req.n
        parsers = [StreamingToolCallParser() if setup.parse else None for _ in range(n)]
        for p in parsers:
            if p is not None:
                p.feed(setup.prefix)  # the forced start of a call: nothing comes out until it closes
        num_calls = [0] * n
        pending_lp: list[list[dict]] = [[] for _ in range(n)]
        completion = 0
        first: dict = {}
        last: dict = {}
        for k in range(n):
            yield chunk([P.ChatChunkChoice(index=k, delta=P.DeltaMessage(role="assistant", content=""))])

        def logprobs_of(k: int) -> P.ChoiceLogprobs | None:
            if not req.logprobs or not pending_lp[k]:
                return None
            lp = P.ChoiceLogprobs(content=self._chat_logprobs(pending_lp[k]))
            pending_lp[k] = []
            return lp

        async for i, ev, t in gen.events():
            self._observe(t0, first, last, i, ev, t)
            k = ev.index
            completion += len(ev.token_ids)
            pending_lp[k] += ev.logprobs or []
            deltas: list[P.DeltaMessage] = []
            parser = parsers[k]
            if parser is None:
                if ev.text:
                    deltas.append(P.DeltaMessage(content=ev.text))
            else:
                events = parser.feed(ev.text) + (parser.finish() if ev.finish_reason is not None else [])
                for e in events:
                    if isinstance(e, ContentEvent):
                        deltas.append(P.DeltaMessage(content=e.text))
                    elif isinstance(e, ToolCallEvent) and (req.parallel_tool_calls or num_calls[k] == 0):
                        deltas.append(P.DeltaMessage(tool_calls=[P.ToolCallDelta(
                            index=num_calls[k], id=_call_id(), type="function",
                            function=P.FunctionCallDelta(name=e.name, arguments=e.arguments_json))]))
                        num_calls[k] += 1
            for d in deltas:
                yield chunk([P.ChatChunkChoice(index=k, delta=d, logprobs=logprobs_of(k))])
            if ev.finish_reason == "abort":
                yield _sse(_error_body(500, "the request was aborted by the engine", code="engine_error"))
                yield _sse("[DONE]")
                return
            if ev.finish_reason is not None:
                reason = "tool_calls" if num_calls[k] else ev.finish_reason
                yield chunk([P.ChatChunkChoice(index=k, delta=P.DeltaMessage(), logprobs=logprobs_of(k),
                                               finish_reason=reason)])
        self.e2e.observe(time.perf_counter() - t0)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], _usage(prompt_len, completion, gen.num_cached_tokens()))
        yield _sse("[DONE]")

    # -- legacy completions -------------------------------------------------------------------------------------

    async def completions(self, req: P.CompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        self._check_model(req.model)
        self._check_common(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (completions are not ranked server-side)", "best_of")
        prompts = req.prompts()
        ids_list: list[list[int]] = []
        for p in prompts:
            ids = await self._blocking(self.tokenizer.encode, p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            ids_list.append(ids)
        jobs = []
        prompt_logprobs = req.logprobs if req.echo else None  # the echoed prompt's logprobs (vLLM's way)
        for ids in ids_list:
            max_tokens = self._budget(len(ids), req.max_tokens, "max_tokens", "prompt")
            jobs.append((ids, self._sampling(req, max_tokens, req.logprobs, {}, prompt_logprobs)))
        echoes = [""] * len(prompts)
        if req.echo:
            echoes = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = _Generation(self.llm, rid, jobs)
        await self._start(gen, "prompt")
        prompt_tokens = sum(len(ids) for ids in ids_list)
        if req.stream:
            return self._stream_response(gen, request, self._completion_stream(gen, req, rid, ids_list, echoes, t0))
        samples = await self._collect(gen, request, len(prompts), req.n, t0)
        choices = []
        for i, row in enumerate(samples):
            for k, s in enumerate(row):
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(s.logprobs, self._offsets(len(echoes[i]), req))
                    if prompt_logprobs is not None:
                        lp = self._joined(self._echo_logprobs(ids_list[i], row[0].prompt_logprobs or []), lp)
                choices.append(P.CompletionChoice(index=i * req.n + k, text=echoes[i] + s.text, logprobs=lp,
                                                  finish_reason=s.finish_reason))
        usage = _usage(prompt_tokens, sum(len(s.token_ids) for row in samples for s in row), gen.num_cached_tokens())
        return JSONResponse(P.CompletionResponse(id=rid, model=self.model_name, choices=choices,
                                                 usage=usage).model_dump())

    @staticmethod
    def _joined(a: P.CompletionLogprobs, b: P.CompletionLogprobs) -> P.CompletionLogprobs:
        return P.CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                                    top_logprobs=a.top_logprobs + b.top_logprobs,
                                    text_offset=a.text_offset + b.text_offset)

    async def _completion_stream(self, gen: _Generation, req: P.CompletionRequest, rid: str,
                                 ids_list: list[list[int]], echoes: list[str], t0: float) -> AsyncIterator[str]:
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in ids_list)

        def chunk(choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> str:
            c = P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            return _sse(c.model_dump())

        n = req.n
        offsets = {(i, k): self._offsets(len(e), req) for i, e in enumerate(echoes) for k in range(n)}
        # With echo and logprobs, a prompt's echo carries its logprobs, which come with the first event of its
        # sample 0: events of the prompt's other samples wait for it (they may finish their prefill first).
        held: dict[int, list] = {i: [] for i in range(len(echoes))} if req.echo and req.logprobs is not None else {}
        for i, e in enumerate(echoes):
            for k in range(n):
                if e and i not in held:
                    yield chunk([P.CompletionChoice(index=i * n + k, text=e, finish_reason=None)])
        completion = 0
        first: dict = {}
        last: dict = {}
        async for i, ev, t in gen.events():
            ready = [(ev, t)]
            if i in held:
                held[i].append((ev, t))
                if ev.prompt_logprobs is None:
                    continue
                ready = held.pop(i)
                lp = self._echo_logprobs(ids_list[i], ev.prompt_logprobs)
                for k in range(n):
                    yield chunk([P.CompletionChoice(index=i * n + k, text=echoes[i], logprobs=lp, finish_reason=None)])
            for ev, t in ready:
                self._observe(t0, first, last, i, ev, t)
                completion += len(ev.token_ids)
                if ev.finish_reason == "abort":
                    yield _sse(_error_body(500, "the request was aborted by the engine", code="engine_error"))
                    yield _sse("[DONE]")
                    return
                lp = None
                if req.logprobs is not None and ev.logprobs:
                    lp = self._completion_logprobs(ev.logprobs, offsets[(i, ev.index)])
                if ev.text or lp is not None or ev.finish_reason is not None:
                    yield chunk([P.CompletionChoice(index=i * n + ev.index, text=ev.text, logprobs=lp,
                                                    finish_reason=ev.finish_reason)])
        self.e2e.observe(time.perf_counter() - t0)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], _usage(prompt_tokens, completion, gen.num_cached_tokens()))
        yield _sse("[DONE]")

    # -- models, health, metrics --------------------------------------------------------------------------------

    def model_card(self) -> P.ModelCard:
        return P.ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    def engine_error(self) -> BaseException | None:
        return self.llm.error  # set when an engine step raised

    async def metrics_text(self) -> str:
        s = await self._blocking(self.llm.stats)
        parts = [self.requests_total.render()]

        def family(name: str, kind: str, help_text: str, value: float) -> None:
            parts.append(render_family(name, kind, help_text, [("", (), value)]))

        family("qwen3next_prompt_tokens_total", "counter", "Prompt tokens accepted by the engine.", s["prompt_tokens"])
        family("qwen3next_generation_tokens_total", "counter", "Tokens generated by the engine.",
               s["generation_tokens"])
        family("qwen3next_engine_requests_total", "counter", "Requests accepted by the engine.", s["requests"])
        family("qwen3next_engine_steps_total", "counter", "Engine forward steps.", s["steps"])
        family("qwen3next_preemptions_total", "counter", "Sequences preempted for lack of cache.", s["preemptions"])
        family("qwen3next_running_sequences", "gauge", "Sequences holding cache and being decoded.", s["running"])
        family("qwen3next_waiting_sequences", "gauge", "Sequences waiting to be scheduled.", s["waiting"])
        family("qwen3next_kv_blocks_total", "gauge", "KV cache blocks in the pool.", s["total_blocks"])
        family("qwen3next_kv_blocks_used", "gauge", "KV cache blocks in use.", s["total_blocks"] - s["free_blocks"])
        family("qwen3next_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.",
               (s["total_blocks"] - s["free_blocks"]) / max(1, s["total_blocks"]))
        family("qwen3next_state_slots_total", "gauge", "DeltaNet state slots in the pool.", s["total_slots"])
        family("qwen3next_state_slots_used", "gauge", "DeltaNet state slots in use.",
               s["total_slots"] - s["free_slots"])
        if "prefix_cache_queries" in s:  # prefix caching (vLLM's names: prefix_cache_queries / _hits, in tokens)
            family("qwen3next_prefix_cache_queries_total", "counter",
                   "Prompt tokens looked up in the prefix cache.", s["prefix_cache_queries"])
            family("qwen3next_prefix_cache_hits_total", "counter",
                   "Prompt tokens found in the prefix cache (not computed again).", s["prefix_cache_hits"])
            family("qwen3next_prefix_cache_blocks", "gauge", "KV cache blocks holding cached prefixes.",
                   s["prefix_cache_blocks"])
            family("qwen3next_prefix_cache_snapshots", "gauge",
                   "DeltaNet state snapshots held by the prefix cache.", s["prefix_cache_snapshots"])
            family("qwen3next_prefix_cache_snapshot_slots", "gauge",
                   "DeltaNet state slots set aside for prefix-cache snapshots.", s["prefix_cache_snapshot_slots"])
            family("qwen3next_prefix_cache_snapshot_bytes", "gauge",
                   "Memory of the DeltaNet state snapshots held by the prefix cache.",
                   s["prefix_cache_snapshot_bytes"])
        if "spec_drafts" in s:  # speculative decoding (vLLM's names: spec_decode_num_*)
            family("qwen3next_spec_decode_num_drafts_total", "counter",
                   "Verifications of MTP drafts (sequences x steps with at least one draft).", s["spec_drafts"])
            family("qwen3next_spec_decode_num_draft_tokens_total", "counter", "MTP draft tokens verified.",
                   s["spec_draft_tokens"])
            family("qwen3next_spec_decode_num_accepted_tokens_total", "counter", "MTP draft tokens accepted.",
                   s["spec_accepted_tokens"])
            family("qwen3next_spec_decode_num_emitted_tokens_total", "counter",
                   "Tokens emitted by verifications (accepted drafts + one sampled token each).",
                   s["spec_emitted_tokens"])
            family("qwen3next_spec_decode_mean_accepted_length", "gauge",
                   "Mean tokens emitted per verification (1 + accepted drafts).", s["spec_mean_accepted_length"])
            family("qwen3next_spec_decode_draft_length", "gauge", "Drafts per sequence chosen for the next step.",
                   s["spec_draft_length"])
            parts.append(render_family(
                "qwen3next_spec_decode_num_accepted_tokens_per_pos", "counter",
                "MTP draft tokens accepted, by draft position (0 = first draft).",
                [("", (("position", str(j)),), n) for j, n in enumerate(s["spec_accepted_per_position"])]))
        parts += [self.ttft.render(), self.itl.render(), self.e2e.render()]
        return "".join(parts)


# ---- app -------------------------------------------------------------------------------------------------------


def create_app(llm: LLM, served_model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `llm` under the name `served_model_name`.

    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>` (/health and /metrics stay open).
    max_body_bytes: larger request bodies get a 413."""
    if not served_model_name:
        raise ValueError("served_model_name: must be a non-empty string")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive int, got {max_body_bytes}")
    server = OpenAIServer(llm, served_model_name)
    app = FastAPI(title="qwen3next", description="OpenAI-compatible API over the qwen3next engine")
    app.state.server = server
    app.add_middleware(_GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       requests_total=server.requests_total)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_response(list(e.errors()))

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, e: ValidationError) -> JSONResponse:
        return _validation_response(list(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(e.status_code, str(e.detail), headers=e.headers)  # e.g. a 405's Allow

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _error_response(500, f"internal server error: {type(e).__name__}", code="internal_error")

    @app.post("/v1/chat/completions", response_model=None,
              responses=_documented(P.ChatCompletionResponse, P.ChatCompletionChunk, 400, 401, 404, 413, 503))
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(req, request)

    @app.post("/v1/completions", response_model=None,
              responses=_documented(P.CompletionResponse, P.CompletionResponse, 400, 401, 404, 413, 503))
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        return await server.completions(req, request)

    @app.get("/v1/models", response_model=P.ModelList, responses=_documented(None, None, 401))
    async def models() -> dict:
        return P.ModelList(data=[server.model_card()]).model_dump()

    @app.get("/v1/models/{model:path}", response_model=P.ModelCard, responses=_documented(None, None, 401, 404))
    async def model(model: str) -> dict:
        server._check_model(model)
        return server.model_card().model_dump()

    @app.get("/health", response_model=P.HealthStatus, responses=_documented(None, None, 503))
    async def health() -> Response:
        error = server.engine_error()
        if error is not None:
            return _error_response(503, f"the engine stopped after an error: {error!r}", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(await server.metrics_text(), media_type=CONTENT_TYPE)

    app.openapi = functools.partial(_openapi, app)
    return app


_ERROR_DESCRIPTIONS = {400: "invalid request (the error's `param` names the field)", 401: "missing or wrong API key",
                       404: "unknown model or path", 413: "request body too large",
                       503: "the engine is not available"}


def _documented(ok: type | None, chunk: type | None, *errors: int) -> dict:
    """OpenAPI `responses` of a route: its errors in OpenAI's error shape and, for a generation route, the 200 body and
    its `stream: true` form (server-sent events, each `data:` line one `chunk` as JSON, then `data: [DONE]`)."""
    out: dict = {code: {"model": P.ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in errors}
    if ok is not None:
        out[200] = {"model": ok, "description": f"the {ok.__name__}, or with `stream: true` a text/event-stream of "
                                              f"`data: <{chunk.__name__} JSON>` events ending with `data: [DONE]`",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return out


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 it documents for body validation: this server answers those with a 400 in
    OpenAI's error shape (documented on each route)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


# ---- `qwen3next serve` -----------------------------------------------------------------------------------------


def _prefix_caching_line(engine) -> str:
    if engine.enable_prefix_caching:
        plan = engine.plan
        return (f"prefix caching: on, state snapshots of {fmt_bytes(plan.geometry.state_bytes_per_slot)} each in "
                f"{plan.num_snapshot_slots:,} slots of their own (--prefix-snapshot-slots) and in the sequence slots "
                f"no request uses")
    return "prefix caching: off (--no-enable-prefix-caching)"


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, print where it is served and its memory plan, and serve until interrupted."""
    import torch
    import uvicorn

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("QWEN3NEXT_API_KEY") or None
    model_dir = Path(args.model)
    name = args.served_model_name or model_dir.resolve().name
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_memory=args.max_memory,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, quantize=args.quantize,
              compile_decode=args.compile, speculative_config=args.speculative_config, hf_overrides=args.hf_overrides,
              enable_prefix_caching=args.enable_prefix_caching, prefix_snapshot_slots=args.prefix_snapshot_slots,
              prefix_snapshot_interval=args.prefix_snapshot_interval)
    try:
        app = create_app(llm, name, api_key, args.max_body_bytes)
        engine = llm.engine
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"qwen3next serve: model '{name}' from {model_dir} ({args.dtype} on {args.device}), max_model_len "
              f"{engine.max_model_len}, max_num_seqs {engine.scheduler.config.max_num_seqs}")
        print(engine.plan.describe())
        print(_prefix_caching_line(engine))
        if engine.speculative is not None:
            spec = engine.speculative
            print(f"speculative decoding: MTP, up to {spec.num_speculative_tokens} drafts per step"
                  f"{' (adaptive)' if spec.adaptive else ''}")
        print("auth: API key required on /v1/*" if api_key else
              "auth: none (anyone who can reach the port can use it; set --api-key or QWEN3NEXT_API_KEY)")
        print(f"serving the OpenAI API on http://{host}:{args.port}/v1  (health: /health, metrics: /metrics)",
              flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5))
        server.run()
        return 0 if server.started else 1
    finally:
        llm.close()
