"""The engine bridge and server-sent events.

The engine runs in its own thread. Each engine request gets a helper thread that submits it (`LLM.submit` waits
for the engine lock) and forwards its blocking event stream into an asyncio.Queue, so the event loop never waits
on the engine. A client that goes away mid-request has its engine request aborted at once, freeing its cache.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.llm import LLM, RequestHandle
from ..engine.output import StreamEvent
from ..engine.sampling import SamplingParams


class Generation:
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


async def abort_on_disconnect(request: Request, gen: Generation) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.abort()
            return


class SSEResponse(StreamingResponse):
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


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
