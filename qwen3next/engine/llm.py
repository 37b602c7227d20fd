"""The engine's public face.

- `Engine`: synchronous core. `add_request(...)` queues a request, `step()` runs one scheduled forward and
  post-processes its tokens (detokenization, stop strings, logprobs), `abort(request_id)` frees at once.
- `LLM`: a thread-safe front end with a background thread driving `Engine.step()`; many clients (a server) can
  submit, stream and abort concurrently. `generate`, `stream`, `chat` are the convenience calls.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import DEFAULT_MODEL
from ..checkpoint import load_model, parse_dtype
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import IncrementalDetokenizer, Tokenizer, parse_tool_calls
from .block_manager import BlockManager, CachePlan, plan_cache
from .runner import ModelRunner, cache_geometry
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import FinishReason, Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, logprob), ...]}
    stop_reason: str | int | None = None  # the stop string or token that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in self.outputs)
        return {"prompt_tokens": len(self.prompt_token_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_token_ids) + completion}

    def tool_calls(self) -> tuple[str, list[dict]]:
        """(content, calls) parsed from the first output's `<tool_call>{json}</tool_call>` blocks."""
        return parse_tool_calls(self.text)


@dataclass
class StreamEvent:
    """New text/tokens of one sample of a request; `finish_reason` is set on its last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None
    finish_reason: str | None = None


class _SampleState:
    def __init__(self, seq: Sequence, tokenizer: Tokenizer):
        self.seq = seq
        self.out = CompletionOutput(index=seq.sample_index, logprobs=[] if seq.params.logprobs is not None else None)
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=seq.params.skip_special_tokens)
        self.full_text = ""  # everything decoded so far (before stop-string truncation)
        self.emitted = 0  # characters of out.text already streamed
        self.emitted_tokens = 0


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, samples: list[_SampleState]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.samples = samples
        self.events: queue.Queue[StreamEvent | None] = queue.Queue()
        self.done = threading.Event()

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_ids, [s.out for s in self.samples], self.done.is_set())


class Engine:
    """Continuous-batching engine over one model. Not thread-safe by itself: `LLM` serialises access."""

    def __init__(self, model: str | Path | Qwen3NextForCausalLM = DEFAULT_MODEL, *, tokenizer: Tokenizer | None = None,
                 dtype: str | torch.dtype | None = "float32", device: str = "cpu", max_memory: int | str | None = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 chunked_prefill: bool = True, prefill_chunk_size: int = 512, block_size: int = 64,
                 quantize: str | None = None, compile_decode: bool = False):
        """`compile_decode`: run decode steps through torch.compile (see `Qwen3NextForCausalLM.compile_decode`);
        the graphs are compiled here, before the engine takes requests (about a minute for small models)."""
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize: expected None, 'int8' or 'int4', got {quantize!r}")
        if isinstance(model, Qwen3NextForCausalLM):
            self.model = model
            if tokenizer is None:
                raise ValueError("tokenizer: required when passing a model object")
            if quantize is not None:
                from ..quant import quantize_model

                quantize_model(model, 8 if quantize == "int8" else 4)
        else:
            path = Path(model)
            if not path.is_dir():
                raise ValueError(f"model: {path} is not a model directory")
            self.model = load_model(path, dtype=parse_dtype(dtype), device=device, quantize=quantize)
            tokenizer = tokenizer or Tokenizer.from_dir(path)
        self.tokenizer = tokenizer
        config = self.model.config
        max_model_len = max_model_len or min(config.max_position_embeddings, 8192)
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        geometry = cache_geometry(self.model, block_size)
        budget = parse_memory(max_memory) if max_memory is not None else default_budget(self.model)
        # Never allocate more than max_num_seqs full-length sequences can use (the pools are zero-filled memory).
        blocks_per_seq = -(-max_model_len // block_size)
        useful = max_num_seqs * (geometry.state_bytes_per_slot + blocks_per_seq * geometry.block_bytes)
        self.plan: CachePlan = plan_cache(geometry, min(budget, useful), max_num_seqs, max_model_len)
        sched_config = SchedulerConfig(max_num_seqs=min(max_num_seqs, self.plan.num_slots),
                                       max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
                                       max_model_len=max_model_len, chunked_prefill=chunked_prefill,
                                       prefill_chunk_size=prefill_chunk_size,
                                       eos_token_ids=tuple(tokenizer.eos_token_ids))
        self.block_manager = BlockManager.from_plan(self.plan)
        self.scheduler = Scheduler(sched_config, self.block_manager)
        self.runner = ModelRunner(self.model, self.plan)
        self.model.compile_decode(compile_decode)
        if compile_decode:
            self.model.warm_up_decode(self.runner.cache)
        self.requests: dict[str, _Request] = {}
        self._seq_to_sample: dict[int, tuple[_Request, _SampleState]] = {}
        self._ids = itertools.count()
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "preemptions": 0}

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    # ---- requests -----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt: expected a string or a list of token ids")
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab})")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> _Request:
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                             f"{self.max_model_len}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        samples = [_SampleState(Sequence(f"{request_id}#{i}", ids, params, i), self.tokenizer) for i in range(params.n)]
        req = _Request(request_id, ids, params, samples)
        for s in samples:
            self.scheduler.add(s.seq)  # may raise ValueError (can never fit)
        self.requests[request_id] = req
        for s in samples:
            self._seq_to_sample[id(s.seq)] = (req, s)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return req

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        for s in req.samples:
            if not s.seq.is_finished:
                self.scheduler.abort(s.seq.request_id)
                self._finish_sample(req, s, FinishReason.ABORT.value)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one forward; returns False when there was nothing to do."""
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        out = self.runner.execute(batch)
        sampled = batch.sampled_seqs
        tokens = out.token_ids.tolist() if out is not None else []
        self.scheduler.update(batch, tokens)
        self.stats["steps"] += 1
        self.stats["preemptions"] = self.scheduler.num_preemptions
        for j, seq in enumerate(sampled):
            entry = self._seq_to_sample.get(id(seq))
            if entry is None:
                continue
            req, s = entry
            if s.out.finish_reason is not None:
                continue  # aborted meanwhile
            self._accept_token(req, s, tokens[j], out, j)
        return True

    def _accept_token(self, req: _Request, s: _SampleState, token: int, out, j: int) -> None:
        p = s.seq.params
        self.stats["generation_tokens"] += 1
        finished_by_token = s.seq.is_finished and s.seq.finish_reason == FinishReason.STOP
        s.out.token_ids.append(token)
        if s.out.logprobs is not None:
            entry = {"token_id": token, "logprob": float(out.logprobs[j])}
            if p.logprobs and out.top_token_ids is not None:
                entry["top"] = list(zip(out.top_token_ids[j, : p.logprobs].tolist(),
                                        out.top_logprobs[j, : p.logprobs].tolist()))
            s.out.logprobs.append(entry)
        if not finished_by_token:  # the text of an EOS / stop token is not part of the output
            s.full_text += s.detok.push(token)
        if s.seq.is_finished:
            s.full_text += s.detok.flush()
        stop_at = _find_stop(s.full_text, p.stop, len(s.out.text))
        if stop_at is not None:
            pos, stop = stop_at
            s.out.text = s.full_text[:pos]
            s.out.stop_reason = stop
            if not s.seq.is_finished:
                self.scheduler.finish(s.seq, FinishReason.STOP)
            self._finish_sample(req, s, FinishReason.STOP.value)
            return
        s.out.text = s.full_text
        if s.seq.is_finished:
            if finished_by_token:
                s.out.stop_reason = token
            self._finish_sample(req, s, s.seq.finish_reason.value)
        else:
            self._emit(req, s, holdback=max((len(x) for x in p.stop), default=1) - 1)

    def _emit(self, req: _Request, s: _SampleState, holdback: int = 0, finish_reason: str | None = None) -> None:
        end = max(s.emitted, len(s.out.text) - holdback)
        text = s.out.text[s.emitted:end]
        toks = s.out.token_ids[s.emitted_tokens:]
        if not text and not toks and finish_reason is None:
            return
        logprobs = s.out.logprobs[s.emitted_tokens:] if s.out.logprobs is not None else None
        s.emitted, s.emitted_tokens = end, len(s.out.token_ids)
        req.events.put(StreamEvent(s.out.index, text, toks, logprobs, finish_reason))

    def _finish_sample(self, req: _Request, s: _SampleState, reason: str) -> None:
        s.out.finish_reason = reason
        self._emit(req, s, 0, reason)
        self._seq_to_sample.pop(id(s.seq), None)
        if all(x.out.finish_reason is not None for x in req.samples):
            self.requests.pop(req.request_id, None)
            req.done.set()
            req.events.put(None)


def _find_stop(text: str, stops: list[str], searched: int) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string that ends past `searched` - len(stop) (only new text matters)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, searched - len(stop) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string like '512MiB', '2GB', '1.5G'."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory: expected a positive size, got {value}")
        return value
    s = str(value).strip().lower().replace(" ", "")
    units = {"gib": 1024**3, "mib": 1024**2, "kib": 1024, "gb": 10**9, "mb": 10**6, "kb": 10**3, "g": 1024**3,
             "m": 1024**2, "k": 1024, "b": 1, "": 1}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            try:
                n = float(s[: len(s) - len(u)] if u else s)
            except ValueError:
                break
            if n <= 0:
                break
            return int(n * units[u])
    raise ValueError(f"max_memory: expected a size like '512MiB' or '2GiB', got {value!r}")


def default_budget(model: Qwen3NextForCausalLM, fraction: float = 0.25, cap: int = 8 * 1024**3) -> int:
    """A quarter of the currently available memory (RAM, or GPU memory for CUDA models), at most 8 GiB."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(min(free * fraction, cap))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info.get("MemAvailable", 4 * 1024**3)
    except OSError:
        avail = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 4 << 30
    return int(min(avail * fraction, cap))


class LLM:
    """Thread-safe engine front end: `LLM(model_dir, **engine_options)`.

    Only the background engine thread touches the `Engine`. Client calls (submit, abort) are queued and applied
    between two steps, so a client waits at most for the step in flight; `submit` returns a handle whose `events()`
    stream and `result()` wait on the request.
    """

    def __init__(self, model: str | Path | Qwen3NextForCausalLM = DEFAULT_MODEL, **engine_options):
        self.engine = Engine(model, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._wake = threading.Condition()
        self._pending: list[tuple[object, Future]] = []
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwen3next-engine", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread, or None while it is healthy."""
        return self._error

    @property
    def is_alive(self) -> bool:
        return self._error is None and not self._closed and self._thread.is_alive()

    # ---- background loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self.engine.has_work():
                    self._wake.wait()
                if self._closed:
                    ops, self._pending = self._pending, []
                    for _, fut in ops:
                        fut.set_exception(RuntimeError("the engine is closed"))
                    return
                ops, self._pending = self._pending, []
            for fn, fut in ops:
                try:
                    fut.set_result(fn())
                except Exception as e:  # a bad request fails only its caller
                    fut.set_exception(e)
            if not self.engine.has_work():
                continue
            try:
                self.engine.step()
            except BaseException as e:  # never leave clients waiting forever on a dead engine
                with self._wake:
                    self._error = e
                    self._closed = True
                    ops, self._pending = self._pending, []
                for _, fut in ops:
                    fut.set_exception(RuntimeError(f"the engine stopped after an error: {e!r}"))
                for req in list(self.engine.requests.values()):
                    self.engine.abort(req.request_id)
                raise

    def _call(self, fn):
        """Run `fn()` on the engine thread between two steps and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._wake:
            if self._error is not None:
                raise RuntimeError(f"the engine stopped after an error: {self._error!r}")
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append((fn, fut))
            self._wake.notify_all()
        return fut.result()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests -----------------------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        req = self._call(lambda: self.engine.add_request(prompt, params, request_id))
        return RequestHandle(self, req)

    def abort(self, request_id: str) -> bool:
        return self._call(lambda: self.engine.abort(request_id))

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        return [h.result() for h in handles]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of the first sample as tokens are produced."""
        handle = self.submit(prompt, sampling_params)
        try:
            for ev in handle.events():
                if ev.index == 0 and ev.text:
                    yield ev.text
        finally:
            if not handle.done:
                self.abort(handle.request_id)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None) -> RequestOutput:
        return self.generate([self.chat_prompt(messages, tools)], sampling_params)[0]

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def stats(self) -> dict:
        """Counters and pool usage (read without stopping the engine; values may be one step apart)."""
        engine = self.engine
        bm = engine.block_manager
        return {**engine.stats, "running": engine.scheduler.num_running, "waiting": engine.scheduler.num_waiting,
                "free_blocks": bm.num_free_blocks, "total_blocks": engine.plan.num_blocks,
                "free_slots": bm.num_free_slots, "total_slots": engine.plan.num_slots}


class RequestHandle:
    def __init__(self, llm: LLM, req: _Request):
        self._llm, self._req = llm, req
        self.request_id = req.request_id

    @property
    def done(self) -> bool:
        return self._req.done.is_set()

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        while True:
            ev = self._req.events.get(timeout=timeout)
            if ev is None:
                return
            yield ev

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._req.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        return self._req.output()

    def abort(self) -> bool:
        return self._llm.abort(self.request_id)
