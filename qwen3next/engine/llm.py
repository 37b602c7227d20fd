"""The engine's public face.

- `Engine`: synchronous core. `add_request(...)` queues a request, `step()` runs one scheduled forward and
  post-processes its tokens (output.py: detokenization, stop strings, logprobs), `abort(request_id)` frees at once.
- `LLM`: a thread-safe front end with a background thread driving `Engine.step()`; many clients (a server) can
  submit, stream and abort concurrently. `generate`, `stream`, `chat` are the convenience calls.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch

from .. import DEFAULT_MODEL, kernels
from ..checkpoint import load_model, parse_dtype, quantize_bits, stored_matrix_dtypes
from ..config import Qwen3NextConfig
from ..model.cache import resolve_kv_cache_dtype
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer, generation_eos_ids
from .block_manager import BlockManager
from .memory import CachePlan, default_budget, engine_cache_plan
from .output import (
    CompletionOutput,
    Logprob,
    RequestOutput,
    RequestState,
    SampleState,
    StreamEvent,
    logprob_entry,
    prompt_logprob_dicts,
)
from .prefix_cache import SnapshotPolicy, default_snapshot_interval
from .runner import ModelRunner, cache_geometry, cuda_graph_steps
from .sampling import SamplingParams
from .scheduler import DEFAULT_SCHEDULER_STEPS, Scheduler, SchedulerConfig
from .sequence import FinishReason, Sequence
from .speculative import DraftLengthPolicy, SpecStats, SpeculativeConfig
from .structured import GrammarCompiler, GrammarMatcher

__all__ = ["LLM", "CompletionOutput", "Engine", "Logprob", "RequestHandle", "RequestOutput", "StreamEvent"]

log = logging.getLogger(__name__)


def parse_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device the engine can run on ("cpu", "cuda", "cuda:N"), or a ValueError that names it:
    an unknown spelling, a device type the engine does not support, CUDA without a GPU, or a GPU index past the
    last one."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                             f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a build without CUDA'})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif d.type != "cpu":
        raise ValueError(f"device {str(device)!r}: the engine runs on 'cpu' or 'cuda' devices")
    return d


def _model_and_tokenizer(model: str | Path | Qwen3NextForCausalLM, tokenizer: Tokenizer | None,
                         dtype: str | torch.dtype | None, device: torch.device, quantize: str | None,
                         hf_overrides: dict | None = None,
                         skip_tokenizer_init: bool = False) -> tuple[Qwen3NextForCausalLM, Tokenizer | None]:
    """The model (loaded from a directory with `hf_overrides` applied to its config, or the given object, quantized
    in place when asked) and its tokenizer (None with `skip_tokenizer_init`)."""
    bits = quantize_bits(quantize)
    if skip_tokenizer_init and tokenizer is not None:
        raise ValueError("tokenizer: not with skip_tokenizer_init=True (which runs without one)")
    if isinstance(model, Qwen3NextForCausalLM):
        if tokenizer is None and not skip_tokenizer_init:
            raise ValueError("tokenizer: required when passing a model object (or skip_tokenizer_init=True)")
        if hf_overrides is not None:
            raise ValueError("hf_overrides: applies when loading a model directory; a model object is already built "
                             "(pass Qwen3NextConfig.from_dict(..., hf_overrides=...) when building it)")
        if bits is not None:
            from ..quant import quantize_model

            quantize_model(model, bits)
        return model, tokenizer
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model: {path} is not a model directory")
    if tokenizer is None and not skip_tokenizer_init and not (path / "tokenizer.json").is_file():
        raise ValueError(f"model: {path} has no tokenizer.json; pass skip_tokenizer_init=True to run on token ids "
                         f"(prompts as lists of ids, outputs as token ids)")
    dtype = parse_dtype(dtype)
    quantize = weight_storage(path, dtype, device, quantize)
    loaded = load_model(path, dtype=dtype, device=device, quantize=quantize, hf_overrides=hf_overrides)
    return loaded, None if skip_tokenizer_init else tokenizer or Tokenizer.from_dir(path)


def weight_storage(path: Path, dtype: torch.dtype, device: torch.device, quantize: str | None) -> str | None:
    """The `quantize` the engine loads the directory `path` with: the one asked for ("none": every weight in
    `dtype`); by default (None), "bf16" - the projections, experts and lm_head kept in bf16 STORAGE, fp32 compute
    (`quant.quantize.store_bf16`) - for a checkpoint whose matrices are all stored in bf16 (Qwen3-Next's are),
    loaded as float32 on a CPU where the native kernels run (they read bf16 weights converting in register): the
    same values as an fp32 copy (bf16 values are exact in fp32), half the bytes per decode step and half the
    memory. Measured on the demo model (1 thread, eager, 512-token context): decode 1.27x (batch 1) and 1.17x
    (batch 8) faster, logits within 5e-5 of the fp32 copy's, a 512-token prefill ~3% slower (more than 8 rows
    convert each weight to fp32 per call)."""
    if quantize is not None:
        return None if quantize == "none" else quantize
    if dtype != torch.float32 or device.type != "cpu" or not kernels.available():
        return None
    return "bf16" if stored_matrix_dtypes(path) == {torch.bfloat16} else None


def _eos_without_tokenizer(model: str | Path | Qwen3NextForCausalLM, config: Qwen3NextConfig) -> tuple[int, ...]:
    """The end-of-sequence ids of a model run without its tokenizer: config.json's `eos_token_id` and, for a model
    directory, generation_config.json's."""
    value = config.eos_token_id
    ids = [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]
    if not isinstance(model, Qwen3NextForCausalLM):
        ids += generation_eos_ids(model)
    return tuple(dict.fromkeys(ids))  # in order, without duplicates


def _tensor_parallel_spec(model, size, dtype, device, quantize, hf_overrides, compile_decode, kv_cache_dtype=None):
    """How the ranks of a tensor-parallel engine load the model (parallel/engine.py), after checking what it needs;
    this process's torch threads become each rank's share of the cores (`rank_threads`)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size: expected a positive int, got {size!r}")
    if not isinstance(model, (str, Path)) or not Path(model).is_dir():
        raise ValueError("tensor_parallel_size: each rank loads its shard from a model directory; pass its path "
                         f"(got {type(model).__name__ if not isinstance(model, (str, Path)) else model})")
    if compile_decode:
        raise ValueError("compile_decode: not with tensor_parallel_size > 1 yet (the compiled step has no "
                         "collectives)")
    if torch.device(device).type != "cpu":
        raise ValueError(f"tensor_parallel_size: runs on CPU ranks over gloo; device {str(device)!r} (NCCL) is not "
                         f"supported yet")
    from ..parallel.engine import ShardSpec, rank_threads
    from ..parallel.plan import TPPlan

    config = Qwen3NextConfig.from_pretrained(model, hf_overrides)
    TPPlan(config, size, 0)  # a split that cannot be done fails here, before any worker starts
    threads = rank_threads(size)
    if threads != torch.get_num_threads():
        log.info("tensor_parallel_size %d: %d torch threads per rank (was %d: the cores are shared among the ranks)",
                 size, threads, torch.get_num_threads())
        torch.set_num_threads(threads)
    return ShardSpec(str(model), dtype, quantize, hf_overrides, size, threads, kv_cache_dtype)


def _context_error(config: Qwen3NextConfig, max_model_len: int) -> str:
    """Why `max_model_len` is refused: the model's longest context, where it comes from, and how to extend it."""
    limit, original = config.max_context_len, config.original_context_len
    source = f"{config.rope_description()}, max_position_embeddings {config.max_position_embeddings:,}"
    factor = math.ceil(max_model_len / original * 10) / 10
    hint = json.dumps({"rope_scaling": {"rope_type": "yarn", "factor": factor,
                                        "original_max_position_embeddings": original}})
    return (f"max_model_len: {max_model_len:,} exceeds the model's context of {limit:,} tokens ({source}); lower "
            f"max_model_len (--max-model-len), or extend the context with YaRN: hf_overrides={hint} (--hf-overrides)")


class Engine:
    """Continuous-batching engine over one model. Not thread-safe by itself: `LLM` serialises access."""

    def __init__(self, model: str | Path | Qwen3NextForCausalLM = DEFAULT_MODEL, *, tokenizer: Tokenizer | None = None,
                 dtype: str | torch.dtype | None = "float32", device: str = "cpu", max_memory: int | str | None = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 chunked_prefill: bool = True, prefill_chunk_size: int = 512, block_size: int = 64,
                 quantize: str | None = None, compile_decode: bool = False,
                 speculative_config: SpeculativeConfig | dict | str | None = None, hf_overrides: dict | None = None,
                 enable_prefix_caching: bool = True, prefix_snapshot_slots: int | None = None,
                 prefix_snapshot_interval: int | None = None, skip_tokenizer_init: bool = False,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 num_scheduler_steps: int | None = None, kv_cache_dtype: str | torch.dtype | None = "auto"):
        """`quantize`: "int8" / "int4" weight-only quantization at load, "bf16" bf16-stored weights with fp32
        compute, "none" every weight in `dtype`; None (default): "bf16" for a checkpoint stored in bf16 loaded as
        float32 on a CPU with the native kernels (exact: `weight_storage`), else "none".
        `compile_decode`: run decode steps through torch.compile (see engine/compiled.py);
        the graphs are compiled here, before the engine takes requests (about a minute for small models).
        `speculative_config`: `{"method": "mtp", "num_speculative_tokens": k}` drafts up to k tokens per step with
        the model's MTP head and verifies them in one forward (engine/speculative.py); exact, adaptive by default.
        `hf_overrides`: config.json values to change at load (vLLM's option name; merged by
        `config.apply_hf_overrides`), e.g. `{"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 262144}}`; `max_model_len` may then go up to `config.max_context_len`
        (original_max_position_embeddings x factor).
        `enable_prefix_caching` (vLLM's name): reuse the KV blocks and DeltaNet state snapshots of earlier requests'
        prefixes (engine/prefix_cache.py); `prefix_snapshot_slots` state slots are added for snapshots, which also use
        the sequence slots no sequence needs (None: four per sequence from the budget beyond max_num_seqs sequences of
        max_model_len, at most a quarter of it) and long prompts leave one every `prefix_snapshot_interval`
        tokens (a multiple of block_size; None: chosen from the memory budget, 0: none).
        `skip_tokenizer_init` (vLLM's name): run without a tokenizer (a bare checkpoint): prompts are lists of token
        ids, outputs carry token ids and empty text, generation ends at config.json / generation_config.json's
        eos_token_id; stop strings and chat need the tokenizer.
        `tensor_parallel_size` (vLLM's name) N > 1: the model and its cache are split over N ranks on this machine
        (parallel/: attention and DeltaNet heads, experts, MLP channels, vocabulary), this process rank 0 and N - 1
        worker processes, joined over gloo; `max_memory` is then per rank (default: the one-process default divided
        among the ranks on this machine), and each rank, this process included until `close()`, runs at most this
        machine's CPUs / (ranks on it) torch threads. Call `close()` (or use `LLM`, which does) to stop the
        workers.
        `enforce_eager` (vLLM's name): on a CUDA GPU, run decode steps eagerly instead of as CUDA graphs
        (engine/cuda_graph.py); no effect on a CPU.
        `num_scheduler_steps` (vLLM's name): multi-step decoding: while every running sequence decodes greedily
        (no penalties, logprobs or grammar) and nothing waits, one schedule runs up to this many decode steps in a
        row, runs kept to about 20 ms (engine/scheduler.py); None: DEFAULT_SCHEDULER_STEPS (8); 1: one step per
        schedule. With speculative decoding, for the steps the draft policy gives no drafts; not with tensor
        parallelism (one step per schedule there).
        `kv_cache_dtype` (vLLM's name): the dtype of the attention layers' K/V cache: "auto" (default) the activation
        dtype (exact); "bfloat16" / "float16": half the bytes of an fp32 cache (twice the tokens in the same memory,
        half the bytes a decode step's attention reads; keys and values are rounded once as they are stored, the
        attention itself still runs in the activation dtype); "float32". The DeltaNet states keep their dtype."""
        if num_scheduler_steps is None:
            num_scheduler_steps = DEFAULT_SCHEDULER_STEPS
        if not isinstance(num_scheduler_steps, int) or isinstance(num_scheduler_steps, bool) \
                or num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps: expected an integer >= 1, got {num_scheduler_steps!r}")
        resolve_kv_cache_dtype(kv_cache_dtype, torch.float32)  # a bad value fails before anything loads
        device = parse_device(device)
        self.speculative = SpeculativeConfig.parse(speculative_config)
        if self.speculative is not None and tensor_parallel_size != 1 and self.speculative.draft_head == "int8":
            raise ValueError("speculative_config: draft_head 'int8' is not supported with tensor_parallel_size > 1 "
                             "(the drafts read the vocabulary-parallel lm_head); leave draft_head unset")
        if self.speculative is not None and tensor_parallel_size != 1 and self.speculative.speculative_token_map:
            raise ValueError("speculative_config: speculative_token_map is not supported with tensor_parallel_size > 1 "
                             "(the drafts read the vocabulary-parallel lm_head)")
        self.tp = None
        self._threads = torch.get_num_threads()  # a tensor-parallel engine sets rank 0's share until it closes
        if tensor_parallel_size != 1:
            from ..parallel.engine import TPGroup

            try:
                spec = _tensor_parallel_spec(model, tensor_parallel_size, dtype, device, quantize, hf_overrides,
                                             compile_decode, kv_cache_dtype)
                # The tokenizer before the workers: a missing tokenizer.json fails before any of them starts.
                self.tokenizer = None if skip_tokenizer_init else tokenizer or Tokenizer.from_dir(model)
                spec_k = self.speculative.num_speculative_tokens if self.speculative is not None else 0
                self.tp = TPGroup(spec, spec_k)
                self.model = self.tp.load()
            except BaseException:
                torch.set_num_threads(self._threads)
                raise
        else:
            self.model, self.tokenizer = _model_and_tokenizer(model, tokenizer, dtype, device, quantize,
                                                              hf_overrides, skip_tokenizer_init)
        try:
            self._setup(max_memory, max_num_seqs, max_num_batched_tokens, max_model_len, chunked_prefill,
                        prefill_chunk_size, block_size, compile_decode, enable_prefix_caching, prefix_snapshot_slots,
                        prefix_snapshot_interval, model, enforce_eager, num_scheduler_steps,
                        resolve_kv_cache_dtype(kv_cache_dtype, self.model.dtype))
        except BaseException:
            self.close()
            raise

    def _setup(self, max_memory, max_num_seqs, max_num_batched_tokens, max_model_len, chunked_prefill,
               prefill_chunk_size, block_size, compile_decode, enable_prefix_caching, prefix_snapshot_slots,
               prefix_snapshot_interval, model, enforce_eager=False, num_scheduler_steps=1,
               kv_cache_dtype: torch.dtype | None = None) -> None:
        config = self.model.config
        if self.speculative is not None and self.model.mtp is None:
            raise ValueError("speculative_config: method 'mtp' needs the model's MTP head, but this model has no "
                             "mtp.* weights (num_nextn_predict_layers = 0)")
        max_model_len = max_model_len or min(config.max_context_len, 8192)
        if max_model_len > config.max_context_len:
            raise ValueError(_context_error(config, max_model_len))
        spec_k = self.speculative.num_speculative_tokens if self.speculative is not None else 0
        for name, value in (("prefix_snapshot_slots", prefix_snapshot_slots),
                            ("prefix_snapshot_interval", prefix_snapshot_interval)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}: expected an integer >= 0 or None (automatic), got {value!r}")
        if prefix_snapshot_interval and prefix_snapshot_interval % block_size:
            raise ValueError(f"prefix_snapshot_interval: {prefix_snapshot_interval} must be a multiple of block_size "
                             f"({block_size})")
        self.kv_cache_dtype = kv_cache_dtype or self.model.dtype
        geometry = cache_geometry(self.model, block_size, include_mtp=spec_k > 0, kv_dtype=self.kv_cache_dtype)
        token_map = None
        if spec_k and self.speculative.speculative_token_map is not None:
            from .draft_vocab import load_token_map

            token_map = load_token_map(self.speculative.speculative_token_map, config.vocab_size)
        if self.tp is not None and max_memory is None:  # every rank allocates rank 0's plan: share the default
            from ..parallel.engine import local_ranks

            max_memory = default_budget(self.model.device) // local_ranks(self.tp.spec.world)
        self.plan: CachePlan = engine_cache_plan(geometry, max_memory, self.model.device, max_num_seqs, max_model_len,
                                                 prefix_snapshot_slots if enable_prefix_caching else 0)
        self.enable_prefix_caching = enable_prefix_caching
        if prefix_snapshot_interval is None:
            prefix_snapshot_interval = default_snapshot_interval(
                block_size, prefill_chunk_size, geometry.kv_bytes_per_token, geometry.state_bytes_per_slot,
                max_model_len, self.plan.num_slots)
        im_end = self.tokenizer.token_to_id("<|im_end|>") if self.tokenizer is not None else None
        policy = SnapshotPolicy(prefix_snapshot_interval, (im_end,) if im_end is not None else ())
        eos = (tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None
               else _eos_without_tokenizer(model, config))
        sched_config = SchedulerConfig(max_num_seqs=min(max_num_seqs, self.plan.num_seq_slots),
                                       max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
                                       max_model_len=max_model_len, chunked_prefill=chunked_prefill,
                                       prefill_chunk_size=prefill_chunk_size,
                                       eos_token_ids=eos, snapshot_policy=policy,
                                       num_scheduler_steps=num_scheduler_steps if self.tp is None else 1)
        self.block_manager = BlockManager.from_plan(self.plan, self.enable_prefix_caching)
        # compiled, or CUDA graphs: only a verification of spec_k drafts has a compiled program (a graph), shorter
        # ones would run eagerly
        graphs = cuda_graph_steps(self.model.device, enforce_eager, self.tp)
        lengths = (0, spec_k) if compile_decode or graphs else None
        policy = DraftLengthPolicy(spec_k, self.speculative.adaptive, lengths=lengths) if spec_k else None
        self.scheduler = Scheduler(sched_config, self.block_manager, policy)
        if self.tp is not None:
            self.tp.start(self.plan)
        self.runner = ModelRunner(self.model, self.plan, compile_decode=compile_decode, num_speculative_tokens=spec_k,
                                  tp=self.tp.comm if self.tp is not None else None,
                                  draft_head=self.speculative.draft_head if spec_k else None,
                                  enforce_eager=enforce_eager, draft_token_map=token_map,
                                  kv_cache_dtype=self.kv_cache_dtype)
        self.requests: dict[str, RequestState] = {}
        self._seq_to_sample: dict[int, tuple[RequestState, SampleState]] = {}
        self._ids = itertools.count()
        self._token_texts: dict[int, str] = {}  # decoded single tokens, for prompt logprobs
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "preemptions": 0,
                      "grammar_seconds": 0.0}  # token masks and matcher advances of constrained requests
        self.spec_stats = SpecStats()
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    # ---- requests -----------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a string needs the tokenizer, and this engine runs without one "
                                 "(skip_tokenizer_init=True): pass a list of token ids")
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
                    request_id: str | None = None, grammar: GrammarMatcher | None = None) -> RequestState:
        """Queue a request. `grammar`: its constraint already compiled (`compile_grammar`, e.g. on the caller's
        thread, so that the engine's step does not wait for it); compiled here when None."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need the tokenizer, and this engine runs without one "
                             "(skip_tokenizer_init=True); use stop_token_ids")
        if grammar is None:
            grammar = self.compile_grammar(params)
        elif params.structured_outputs is None:
            raise ValueError("grammar: given for a request without structured_outputs")
        ids = self.encode_prompt(prompt)
        if len(ids) > self.max_model_len or (len(ids) == self.max_model_len and params.max_tokens > 0):
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                             f"{self.max_model_len}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        samples = [SampleState(Sequence(f"{request_id}#{i}", ids, params, i), self.tokenizer) for i in range(params.n)]
        for i, s in enumerate(samples):
            s.seq.grammar = grammar if i == 0 or grammar is None else grammar.copy()
        req = RequestState(request_id, ids, samples)
        for s in samples:
            self.scheduler.add(s.seq)  # may raise ValueError (can never fit)
        self.requests[request_id] = req
        for s in samples:
            self._seq_to_sample[id(s.seq)] = (req, s)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return req

    @property
    def error(self) -> str | None:
        """Why the engine cannot run (a tensor-parallel worker died, or a step failed on rank 0), or None."""
        return self.tp.error if self.tp is not None else None

    def close(self) -> None:
        """Stop the tensor-parallel workers and give this process back its torch threads (nothing to do on one
        rank)."""
        if self.tp is not None:
            self.tp.close()
            torch.set_num_threads(self._threads)

    def compile_grammar(self, params: SamplingParams) -> GrammarMatcher | None:
        """The matcher of `params.structured_outputs` (None without one); ValueError naming the field when it does
        not compile. Compiling takes milliseconds for a schema (more for big tool lists); thread-safe: `LLM.submit`
        compiles on the caller's thread and hands the matcher to `add_request`."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured_outputs: constrained decoding needs the tokenizer, and this engine runs "
                             "without one (skip_tokenizer_init=True)")
        return self._grammar_compiler().matcher(params.structured_outputs)

    def warm_up_grammars(self) -> None:
        """Build llguidance's token trie now (about 45 ms for the demo vocabulary, 1-2 s for Qwen's 152K), so the
        first constrained request does not wait for it; a server calls this in the background at start."""
        if self.tokenizer is not None:
            _ = self._grammar_compiler().tokenizer

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._grammar_lock:  # compile_grammar runs on callers' threads
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.model.config.vocab_size,
                                                 self.scheduler.config.eos_token_ids)
            return self._grammars

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
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        if self.tp is not None:
            try:
                self.tp.step(batch)
                out = self.runner.execute(batch)
            except BaseException as e:  # the workers may be waiting inside this step: the group is done
                self.tp.fail(f"a tensor-parallel step failed on rank 0: {e!r}")
                raise
        else:
            out = self.runner.execute(batch)
        sampled = batch.sampled_seqs
        before = [seq.num_output_tokens for seq in sampled]
        finished = self.scheduler.update(batch, out.tokens)
        policy = self.scheduler.draft_policy
        self.stats["steps"] += batch.num_steps
        self.stats["preemptions"] = self.scheduler.num_preemptions
        for (b, first, _), chunk in zip(batch.prompt_logprob_spans, out.prompt_logprobs):
            entry = self._seq_to_sample.get(id(batch.entries[b].seq))
            if entry is not None:  # else aborted meanwhile
                entry[0].add_prompt_logprobs(first, prompt_logprob_dicts(chunk, self._token_text))
        for seq in finished:  # a prompt that generates nothing (max_tokens 0) ends without a sampled token
            entry = self._seq_to_sample.get(id(seq)) if seq.params.max_tokens == 0 else None
            if entry is not None:
                self._finish_sample(*entry, seq.finish_reason.value)
        for j, seq in enumerate(sampled):
            if out.num_drafts[j]:
                self.spec_stats.record(out.num_drafts[j], out.num_accepted[j])
                policy.record_acceptance(out.num_drafts[j], out.num_accepted[j])
            if not seq.is_finished:
                seq.draft_token_ids = out.drafts[j] if out.drafts else []
                if seq.grammar is not None:
                    t0 = time.perf_counter()
                    if not seq.grammar.accept(seq.output_token_ids[before[j]:]):
                        self._grammar_failed(seq)
                    out.grammar_seconds += time.perf_counter() - t0
            entry = self._seq_to_sample.get(id(seq))
            if entry is None:
                continue
            req, s = entry
            s.record_verification(out.num_drafts[j], out.num_accepted[j])
            # the tokens the scheduler appended (a stop rule may have cut the run)
            for token, row in zip(seq.output_token_ids[before[j]:], out.rows[j]):
                if s.out.finish_reason is not None:
                    break  # aborted meanwhile, or a stop string ended it
                self._accept_token(req, s, token, out.sampled, row)
        self.stats["grammar_seconds"] += out.grammar_seconds
        # Time the whole step (detokenizing more tokens is part of what drafting costs) when it shows what a draft
        # length costs: decode steps without the MTP head (length 0) and verifications of that many drafts (not
        # the first step after a change, which has none to verify yet).
        per_step = (time.perf_counter() - started) / batch.num_steps
        if policy is not None and batch.num_drafts == batch.num_lookahead and batch.is_decode_step:
            policy.record_step(len(batch), batch.num_drafts, per_step)
        if batch.is_decode_step and not batch.has_drafts:  # what a step costs bounds multi-step runs
            self.scheduler.record_decode_step(per_step)
        return True

    def _grammar_failed(self, seq: Sequence) -> None:
        """A constrained sequence emitted a token its grammar rejects; the masks exclude that, so this is a bug in
        the masking or the grammar engine. The sequence ends (finish reason "abort") rather than go on unchecked."""
        log.error("%s: token outside its %s constraint (%s); aborting the sequence", seq.request_id,
                  seq.grammar.kind, seq.grammar.error)
        self.scheduler.finish(seq, FinishReason.ABORT)

    def _token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _accept_token(self, req: RequestState, s: SampleState, token: int, sampled, row: int) -> None:
        self.stats["generation_tokens"] += 1
        top_n = s.seq.params.logprobs
        reason = s.add_token(token, logprob_entry(sampled, row, token, top_n) if top_n is not None else None)
        if reason is None:
            req.emit(s)
            return
        self.scheduler.finish(s.seq, FinishReason(reason))  # a stop string; no-op when a token rule ended it
        self._finish_sample(req, s, reason)

    def _finish_sample(self, req: RequestState, s: SampleState, reason: str) -> None:
        self._seq_to_sample.pop(id(s.seq), None)
        if req.finish_sample(s, reason):
            self.requests.pop(req.request_id, None)


class LLM:
    """Thread-safe engine front end: `LLM(model_dir, **engine_options)`.

    Only the background engine thread touches the `Engine`; it builds it too (see `__init__`). With more than one
    torch thread, parallel torch work the caller's thread did before (building the model object, for one) leaves
    its OpenMP team alive, and the engine's parallel regions then wait for sleeping workers: `small` preset, fp32,
    2 threads, 20.4 ms per token against 11.2 when the caller's thread did none. Client calls (submit, abort) are
    queued and applied between two steps, so a client waits at most for the step in flight; `submit` returns a
    handle whose `events()` stream and `result()` wait on the request.
    """

    def __init__(self, model: str | Path | Qwen3NextForCausalLM = DEFAULT_MODEL, **engine_options):
        self._wake = threading.Condition()
        self._pending: list[tuple[object, Future]] = []
        self._closed = False
        self._error: BaseException | None = None
        # The Engine is built on the thread that steps it, so that the torch work of loading, quantizing and
        # compiling runs there too. torch's CPU threads are OpenMP's: every thread that runs parallel work keeps its
        # own team of workers, and once the process has more OpenMP threads than cores, libgomp lets a waiting worker
        # spin only ~100 times before it sleeps, so every parallel region waits for a sleeping worker to be woken
        # (on a VM, for its halted vCPU). Measured, `small` preset, 2 threads on 2 cores: built on the caller's
        # thread and stepped here 15-16 ms per token, built here 7.0-7.2 (an Engine built and stepped on the main
        # thread alone: 7.5).
        built: Future = Future()
        self._thread = threading.Thread(target=self._build_and_loop, args=(model, engine_options, built),
                                        name="qwen3next-engine", daemon=True)
        self._thread.start()
        built.result()  # the constructor's error, if it failed; else self.engine is set
        self.tokenizer = self.engine.tokenizer

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread (or the death of a tensor-parallel worker), or None while
        it is healthy."""
        if self._error is None and self.engine.error is not None:
            return RuntimeError(self.engine.error)
        return self._error

    @property
    def is_alive(self) -> bool:
        return self.error is None and not self._closed and self._thread.is_alive()

    # ---- background loop ----------------------------------------------------------------------------------------
    def _build_and_loop(self, model, engine_options: dict, built: Future) -> None:
        try:
            self.engine: Engine = Engine(model, **engine_options)  # set here: the loop below reads it at once
        except BaseException as e:  # re-raised by the constructor, on the caller's thread
            built.set_exception(e)
            return
        built.set_result(None)
        self._loop()

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
            if self.error is not None:
                raise RuntimeError(f"the engine stopped after an error: {self.error!r}")
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
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests -----------------------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        grammar = self.engine.compile_grammar(params) if params is not None else None  # here, not on the engine
        req = self._call(lambda: self.engine.add_request(prompt, params, request_id, grammar))
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
        if self.tokenizer is None:
            raise ValueError("chat: the chat template needs the tokenizer, and this engine runs without one "
                             "(skip_tokenizer_init=True)")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def stats(self) -> dict:
        """Counters and pool usage (read without stopping the engine; values may be one step apart)."""
        engine = self.engine
        bm = engine.block_manager
        out = {**engine.stats, "running": engine.scheduler.num_running, "waiting": engine.scheduler.num_waiting,
               "free_blocks": bm.num_free_blocks, "total_blocks": engine.plan.num_blocks,
               "free_slots": bm.num_free_slots, "total_slots": engine.plan.num_slots}
        if engine.enable_prefix_caching:
            out.update(prefix_cache_queries=bm.queries, prefix_cache_hits=bm.hits,
                       prefix_cache_blocks=bm.num_cached_blocks, prefix_cache_snapshots=bm.num_snapshots,
                       prefix_cache_snapshot_bytes=bm.num_snapshots * engine.plan.geometry.state_bytes_per_slot,
                       prefix_cache_snapshot_slots=engine.plan.num_snapshot_slots)
        if engine.speculative is not None:
            spec, policy = engine.spec_stats, engine.scheduler.draft_policy
            out.update(spec_drafts=spec.num_drafts, spec_draft_tokens=spec.num_draft_tokens,
                       spec_accepted_tokens=spec.num_accepted_tokens, spec_emitted_tokens=spec.num_emitted_tokens,
                       spec_mean_accepted_length=spec.mean_accepted_length,
                       spec_accepted_per_position=list(spec.accepted_per_position[:policy.max_k]),
                       spec_draft_length=policy.last_choice)
        return out


class RequestHandle:
    def __init__(self, llm: LLM, req: RequestState):
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
