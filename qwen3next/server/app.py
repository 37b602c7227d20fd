"""OpenAI-compatible HTTP server over `LLM`: chat and legacy completions (streamed as SSE or not), tool calls,
models, health and Prometheus metrics.

This module holds the request handling (`OpenAIServer`), the app and its routes (`create_app`) and `qwen3next
serve`. The engine bridge and server-sent events are in `streaming`, tool calls in `tools`, errors in `errors`, the
ASGI guard (API key, body size, request counting) in `guard`, token text for logprobs in `text` and the OpenAPI
schema in `openapi`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..engine.llm import LLM
from ..engine.memory import fmt_bytes
from ..engine.output import StreamEvent
from ..engine.sampling import GREEDY_TEMPERATURE_BELOW, SamplingParams, StructuredOutputsParams
from ..tokenizer import ChatTemplateError
from ..tool_calls import TOOL_CALL_END, TOOL_CALL_START
from . import protocol as P
from .args import DEFAULT_MAX_BODY_BYTES, add_serve_args  # noqa: F401  (re-exported)
from .errors import APIError, error_body, error_response, install_error_handlers, leading_name, unencodable_field
from .guard import GuardMiddleware
from .metrics import CONTENT_TYPE, Counter, Histogram, render_family
from .openapi import documented, openapi_schema
from .streaming import Generation, SSEResponse, abort_on_disconnect, sse
from .structured import relabel, request_constraint
from .text import TextOffsets, TokenText, finite
from .tools import ToolCallStream, ToolSetup, call_id, message_tool_calls, tool_setup
from .web import mount_web

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass
class _Sample:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # sample 0 of a request that asked (echo with logprobs)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> P.Usage:
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached_tokens))


# ---- the server ------------------------------------------------------------------------------------------------


class OpenAIServer:
    """Request handling behind the routes of `create_app`."""

    def __init__(self, llm: LLM, served_model_name: str):
        self.llm = llm
        self.model_name = served_model_name
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.created = int(time.time())
        self.token_text = TokenText(llm.tokenizer)
        self.special_ids = llm.tokenizer.special_token_ids
        # the tool-call tags are tokens of their own: "auto" tool choice can be constrained (server/tools.py)
        self.tag_tokens = all(llm.tokenizer.token_to_id(t) is not None for t in (TOOL_CALL_START, TOOL_CALL_END))
        # special tokens a reply may hold around tool calls (a thinking model's reasoning tags)
        self.free_tokens = tuple(t for t in ("<think>", "</think>") if llm.tokenizer.token_to_id(t) is not None)
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
        bad = unencodable_field(req.model_dump(exclude_none=True))
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
                  prompt_logprobs: int | None = None,
                  constraint: StructuredOutputsParams | None = None) -> SamplingParams:
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
                skip_special_tokens=req.skip_special_tokens, structured_outputs=constraint)
        except ValueError as e:
            name = leading_name(str(e))
            raise APIError(400, str(e), renames.get(name, name)) from None

    async def _start(self, gen: Generation, prompt_param: str, constraint_param: str | None = None) -> None:
        """Submit the generation; a ValueError of the engine becomes a 400 naming the request field: the prompt, or
        the field the output constraint came from when its grammar does not compile."""
        try:
            await gen.start()
        except ValueError as e:
            name = leading_name(str(e))
            param = prompt_param if name == "prompt" else constraint_param if name == "structured_outputs" else None
            message = str(e) if param is None or name != "structured_outputs" else relabel(str(e), param)
            raise APIError(400, message, param) from None
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

    async def _collect(self, gen: Generation, request: Request, num_prompts: int, n: int, t0: float
                       ) -> list[list[_Sample]]:
        samples = [[_Sample() for _ in range(n)] for _ in range(num_prompts)]
        watcher = asyncio.ensure_future(abort_on_disconnect(request, gen))
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

    def _stream_response(self, gen: Generation, request: Request, body: AsyncIterator[str]) -> SSEResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for data in body:
                    if await request.is_disconnected():
                        return
                    yield data
            finally:
                gen.abort()

        return SSEResponse(guarded(), gen.abort)

    def _chat_logprobs(self, entries: list[dict]) -> list[P.TokenLogprob]:
        out = []
        for e in entries:
            text, raw = self.token_text(e["token_id"])
            tops = []
            for tid, lp in e.get("top", []):
                ttext, traw = self.token_text(tid)
                tops.append(P.TopLogprob(token=ttext, logprob=finite(lp), bytes=traw))
            out.append(P.TokenLogprob(token=text, logprob=finite(e["logprob"]), bytes=raw, top_logprobs=tops))
        return out

    def _offsets(self, start: int, req: P.SamplingRequest) -> TextOffsets:
        return TextOffsets(start, self.special_ids if req.skip_special_tokens else set())

    def _completion_logprobs(self, entries: list[dict], offsets: TextOffsets) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for e in entries:
            text, raw = self.token_text(e["token_id"])
            top = {text: finite(e["logprob"])}  # OpenAI: the sampled token is always among them
            for tid, v in e.get("top", []):
                top.setdefault(self.token_text(tid)[0], finite(v))
            lp.tokens.append(text)
            lp.token_logprobs.append(finite(e["logprob"]))
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
        offsets = TextOffsets(0, set())
        for token, entry in zip(ids, entries, strict=True):
            text, raw = self.token_text(token)
            lp.tokens.append(text)
            lp.text_offset.append(offsets.advance(token, raw))
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(finite(entry[token].logprob))
            top: dict[str, float] = {}
            for tid, v in entry.items():  # the prompt token first, then the top N
                top.setdefault(self.token_text(tid)[0], finite(v.logprob))
            lp.top_logprobs.append(top)
        return lp

    # -- chat ---------------------------------------------------------------------------------------------------

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
                d["tool_calls"] = [{"id": c.id or call_id(), "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            out.append(d)
        return out

    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        self._check_model(req.model)
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        wanted = request_constraint(req)
        setup = tool_setup(req, self.tag_tokens, wanted, self.free_tokens)
        constraint = setup.constraint
        constraint_param = wanted.field if constraint is wanted.params else "tools"
        messages = self._template_messages(req)
        try:
            text = await self._blocking(self.tokenizer.apply_chat_template, messages, tools=setup.tools,
                                        add_generation_prompt=True)
        except ChatTemplateError as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        ids = await self._blocking(self.tokenizer.encode, text)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._budget(len(ids), requested, max_param, "messages")
        params = self._sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                {"logprobs": "top_logprobs", "max_tokens": max_param}, constraint=constraint)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = Generation(self.llm, rid, [(ids, params)])
        await self._start(gen, "messages", constraint_param)
        if req.stream:
            return self._stream_response(gen, request, self._chat_stream(gen, req, rid, len(ids), setup, t0))
        samples = (await self._collect(gen, request, 1, req.n, t0))[0]
        choices = []
        for k, s in enumerate(samples):
            content, calls = message_tool_calls(setup, s.text, req.parallel_tool_calls)
            choices.append(P.ChatChoice(
                index=k, message=P.AssistantMessage(content=content, tool_calls=calls),
                logprobs=P.ChoiceLogprobs(content=self._chat_logprobs(s.logprobs)) if req.logprobs else None,
                finish_reason="tool_calls" if calls and s.finish_reason == "stop" else s.finish_reason))
        usage = _usage(len(ids), sum(len(s.token_ids) for s in samples), gen.num_cached_tokens())
        return JSONResponse(P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                                     usage=usage).model_dump())

    async def _chat_stream(self, gen: Generation, req: P.ChatCompletionRequest, rid: str, prompt_len: int,
                           setup: ToolSetup, t0: float) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> str:
            c = P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            return sse(c.model_dump())

        n = req.n
        tool_calls = [ToolCallStream(setup, req.parallel_tool_calls) for _ in range(n)]
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
            deltas = tool_calls[k].deltas(ev.text, ev.finish_reason is not None)
            for d in deltas:
                yield chunk([P.ChatChunkChoice(index=k, delta=d, logprobs=logprobs_of(k))])
            if ev.finish_reason == "abort":
                yield sse(error_body(500, "the request was aborted by the engine", code="engine_error"))
                yield sse("[DONE]")
                return
            if ev.finish_reason is not None:
                reason = "tool_calls" if tool_calls[k].num_calls and ev.finish_reason == "stop" else ev.finish_reason
                yield chunk([P.ChatChunkChoice(index=k, delta=P.DeltaMessage(), logprobs=logprobs_of(k),
                                               finish_reason=reason)])
        self.e2e.observe(time.perf_counter() - t0)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], _usage(prompt_len, completion, gen.num_cached_tokens()))
        yield sse("[DONE]")

    # -- legacy completions -------------------------------------------------------------------------------------

    async def completions(self, req: P.CompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        self._check_model(req.model)
        self._check_common(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        wanted = request_constraint(req)
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
            jobs.append((ids, self._sampling(req, max_tokens, req.logprobs, {}, prompt_logprobs, wanted.params)))
        echoes = [""] * len(prompts)
        if req.echo:
            echoes = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = Generation(self.llm, rid, jobs)
        await self._start(gen, "prompt", wanted.field)
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

    async def _completion_stream(self, gen: Generation, req: P.CompletionRequest, rid: str,
                                 ids_list: list[list[int]], echoes: list[str], t0: float) -> AsyncIterator[str]:
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in ids_list)

        def chunk(choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> str:
            c = P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            return sse(c.model_dump())

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
                    yield sse(error_body(500, "the request was aborted by the engine", code="engine_error"))
                    yield sse("[DONE]")
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
        yield sse("[DONE]")

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

    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>` (/health, /metrics and the web chat page at /
    stay open).
    max_body_bytes: larger request bodies get a 413."""
    if not served_model_name:
        raise ValueError("served_model_name: must be a non-empty string")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive int, got {max_body_bytes}")
    server = OpenAIServer(llm, served_model_name)
    app = FastAPI(title="qwen3next", description="OpenAI-compatible API over the qwen3next engine")
    app.state.server = server
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       requests_total=server.requests_total)
    install_error_handlers(app)
    mount_web(app)

    @app.post("/v1/chat/completions", response_model=None,
              responses=documented(P.ChatCompletionResponse, P.ChatCompletionChunk, 400, 401, 404, 413, 503))
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(req, request)

    @app.post("/v1/completions", response_model=None,
              responses=documented(P.CompletionResponse, P.CompletionResponse, 400, 401, 404, 413, 503))
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        return await server.completions(req, request)

    @app.get("/v1/models", response_model=P.ModelList, responses=documented(None, None, 401))
    async def models() -> dict:
        return P.ModelList(data=[server.model_card()]).model_dump()

    @app.get("/v1/models/{model:path}", response_model=P.ModelCard, responses=documented(None, None, 401, 404))
    async def model(model: str) -> dict:
        server._check_model(model)
        return server.model_card().model_dump()

    @app.get("/health", response_model=P.HealthStatus, responses=documented(None, None, 503))
    async def health() -> Response:
        error = server.engine_error()
        if error is not None:
            return error_response(503, f"the engine stopped after an error: {error!r}", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(await server.metrics_text(), media_type=CONTENT_TYPE)

    app.openapi = functools.partial(openapi_schema, app)
    return app


# ---- `qwen3next serve` -----------------------------------------------------------------------------------------


def _prefix_caching_line(engine) -> str:
    if engine.enable_prefix_caching:
        plan = engine.plan
        return (f"prefix caching: on, state snapshots of {fmt_bytes(plan.geometry.state_bytes_per_slot)} each in "
                f"{plan.num_snapshot_slots:,} slots of their own (--prefix-snapshot-slots) and in the sequence slots "
                f"no request uses")
    return "prefix caching: off (--no-enable-prefix-caching)"


WORKER_DEATH_GRACE_S = 3.0  # /health answers 503 this long before the server exits


def _exit_when_workers_die(llm: LLM, server) -> None:
    """A tensor-parallel worker died (or a collective failed, e.g. a torchrun rank on another machine went away): the
    engine cannot run any more. /health says so (503) for a few seconds, then the server shuts down (exit status 1)
    and `llm.close()` reaps the other workers."""
    while llm.error is None and not server.should_exit:
        time.sleep(0.2)
    if llm.error is not None:
        print(f"qwen3next serve: {llm.error}; shutting down", file=sys.stderr, flush=True)
        time.sleep(WORKER_DEATH_GRACE_S)
        server.should_exit = True


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, print where it is served and its memory plan, and serve until interrupted."""
    import torch
    import uvicorn

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from ..cli import torchrun_worker

    if torchrun_worker(args):  # torchrun's rank > 0: runs the model for rank 0, which serves
        return 0
    api_key = args.api_key or os.environ.get("QWEN3NEXT_API_KEY") or None
    model_dir = Path(args.model)
    name = args.served_model_name or model_dir.resolve().name
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_memory=args.max_memory,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, quantize=args.quantize,
              compile_decode=args.compile, enforce_eager=args.enforce_eager,
              num_scheduler_steps=args.num_scheduler_steps, kv_cache_dtype=args.kv_cache_dtype,
              speculative_config=args.speculative_config, hf_overrides=args.hf_overrides,
              enable_prefix_caching=args.enable_prefix_caching, prefix_snapshot_slots=args.prefix_snapshot_slots,
              prefix_snapshot_interval=args.prefix_snapshot_interval, tensor_parallel_size=args.tensor_parallel_size)
    try:
        app = create_app(llm, name, api_key, args.max_body_bytes)
        engine = llm.engine
        threading.Thread(target=engine.warm_up_grammars, name="qwen3next-grammar-warmup", daemon=True).start()
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
        print(f"serving the OpenAI API on http://{host}:{args.port}/v1  (health: /health, metrics: /metrics)")
        print(f"web chat page: http://{host}:{args.port}/", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5))
        if engine.tp is not None:
            threading.Thread(target=_exit_when_workers_die, args=(llm, server), name="qwen3next-tp-watchdog",
                             daemon=True).start()
        server.run()
        return 0 if server.started and llm.error is None else 1
    finally:
        llm.close()
