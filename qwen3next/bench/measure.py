"""Timed runs: prefill and decode for our model (raw cached forwards and the full `Engine` step loop), the same
for transformers' `Qwen3NextForCausalLM`, and the machine's memory bandwidth.

Every function returns the seconds of each timed repeat (per prefill call, or per decode step averaged over a run of
steps) after untimed warmup; the caller takes the median. Prefill computes logits for the last prompt token only on
both sides (what a server needs); decode is one cached forward of B tokens plus a greedy argmax per step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.compiled import CompiledDecoder
from ..engine.llm import Engine
from ..engine.runner import cache_geometry
from ..engine.sampling import SamplingParams
from ..engine.scheduler import DEFAULT_SCHEDULER_STEPS
from ..model.cache import SequenceCache, resolve_kv_cache_dtype
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer

ENGINE_MAX_BATCHED_TOKENS = 2048  # the engine's default


@dataclass(frozen=True)
class DecodePlan:
    """A decode measurement: B prompts of `prompt_len` tokens prefilled, `warmup` untimed steps, then `repeat` timed
    runs of `steps` steps each."""

    batch: int
    prompt_len: int
    steps: int
    repeat: int
    kv_cache_dtype: str = "auto"  # the K/V cache's dtype (the engine's `kv_cache_dtype`)
    warmup: int = 2

    @property
    def total_steps(self) -> int:
        return self.warmup + self.repeat * self.steps

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.total_steps + 1

    @property
    def engine_max_tokens(self) -> int:
        # Sequences prefilled in an earlier engine step already decode while later prompts prefill: room for that,
        # and for the steps a multi-step run takes past each timed round's count.
        return (self.total_steps + 2 + -(-self.batch * self.prompt_len // ENGINE_MAX_BATCHED_TOKENS)
                + DEFAULT_SCHEDULER_STEPS * (self.repeat + 1))

    @property
    def engine_max_len(self) -> int:
        return self.prompt_len + self.engine_max_tokens


def random_weights(config, dtype: torch.dtype, seed: int) -> Qwen3NextForCausalLM:
    """A model of `config` with seeded random weights (`Qwen3NextForCausalLM.init_weights`), in `dtype`, eval mode."""
    model = Qwen3NextForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids [B, T] drawn uniformly (seeded)."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- ours: raw model -------------------------------------------------------------------------------------------------
# Every timed forward (ours and transformers') runs in inference mode, as the engine's steps do.
def _prefill_last_logits(model: Qwen3NextForCausalLM, ids: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
    """Prefill B fresh sequences ids [B, T] into `cache`; logits [B, vocab] of each last token only."""
    B, T = ids.shape
    rows = list(range(B))
    info = cache.batch(rows, [T] * B)
    hidden = model.hidden_states(ids.reshape(-1).to(model.device), model.context(info, cache.hybrid))  # [B*T, D]
    cache.advance(rows, [T] * B)
    return model.lm_head(hidden.view(B, T, -1)[:, -1])


@torch.inference_mode()
def time_prefill_ours(model: Qwen3NextForCausalLM, ids: torch.Tensor, warmup: int, repeat: int) -> list[float]:
    """Seconds per prefill of ids [1, T] into a fresh cache (cache allocation not timed)."""
    times = []
    for r in range(warmup + repeat):
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        t0 = time.perf_counter()
        _prefill_last_logits(model, ids, cache)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def time_decode_ours(model: Qwen3NextForCausalLM, ids: torch.Tensor, plan: DecodePlan,
                     compiled: CompiledDecoder | None = None) -> list[float]:
    """Seconds per decode step: `model(tokens [B, 1], cache)` + argmax (or the compiled decoder's greedy runs of up to
    DEFAULT_SCHEDULER_STEPS steps), after prefilling ids [B, P]."""
    cache = model.new_cache(plan.batch, plan.max_len, kv_cache_dtype=plan.kv_cache_dtype)
    tok = _prefill_last_logits(model, ids, cache).argmax(-1, keepdim=True)  # [B, 1]
    if compiled is not None:  # greedy runs of up to DEFAULT_SCHEDULER_STEPS, as the engine's multi-step decoding
        return _timed_steps(lambda tok, n: compiled.greedy_steps(tok, cache, n)[:, -1:], tok, plan,
                            DEFAULT_SCHEDULER_STEPS)

    def step(tok: torch.Tensor, _: int) -> torch.Tensor:
        return model(tok, cache)[:, -1].argmax(-1, keepdim=True)

    return _timed_steps(step, tok, plan)


def _timed_steps(run, state, plan: DecodePlan, most: int = 1) -> list[float]:
    """Seconds per step: `plan.warmup` steps, then `plan.repeat` timed rounds of `plan.steps`, taken by
    `run(state, n) -> state` n <= `most` steps at a time."""
    def steps(state, total: int):
        while total:
            n = min(total, most)
            state, total = run(state, n), total - n
        return state

    state = steps(state, plan.warmup)
    times = []
    for _ in range(plan.repeat):
        t0 = time.perf_counter()
        state = steps(state, plan.steps)
        times.append((time.perf_counter() - t0) / plan.steps)
    return times


# ---- ours: the engine ------------------------------------------------------------------------------------------------
def time_decode_engine(model: Qwen3NextForCausalLM, tokenizer: Tokenizer, ids: torch.Tensor,
                       plan: DecodePlan) -> list[float]:
    """Seconds per decode step (per token of each sequence) of `Engine.step()` once all B requests are decoding
    (scheduling, cache metadata, sampling and detokenization included; a multi-step schedule takes several steps),
    greedy, EOS ignored."""
    block_size, max_tokens, max_model_len = 64, plan.engine_max_tokens, plan.engine_max_len
    geometry = cache_geometry(model, block_size, kv_dtype=resolve_kv_cache_dtype(plan.kv_cache_dtype, model.dtype))
    blocks_per_seq = -(-max_model_len // block_size)
    budget = plan.batch * (geometry.state_bytes_per_slot + blocks_per_seq * geometry.block_bytes) + 1
    engine = Engine(model, tokenizer=tokenizer, max_memory=budget, max_num_seqs=plan.batch,
                    max_num_batched_tokens=ENGINE_MAX_BATCHED_TOKENS, max_model_len=max_model_len,
                    prefill_chunk_size=512, block_size=block_size, enable_prefix_caching=False,  # decode only
                    kv_cache_dtype=plan.kv_cache_dtype)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(row.tolist(), params) for row in ids]
    while any(not r.samples[0].out.token_ids for r in reqs):  # prefill (possibly chunked over several steps)
        if not engine.step():
            raise RuntimeError("engine stopped before every prompt was prefilled")

    def steps(count: int) -> int:
        """Engine steps until the first request has `count` more tokens -> how many it got."""
        out = reqs[0].samples[0].out.token_ids
        start = len(out)
        while len(out) - start < count:
            if not engine.step() or engine.scheduler.num_running != plan.batch:
                raise RuntimeError(f"engine: expected {plan.batch} sequences decoding, "
                                   f"{engine.scheduler.num_running} ran")
        return len(out) - start

    steps(plan.warmup)
    times = []
    for _ in range(plan.repeat):
        t0 = time.perf_counter()
        n = steps(plan.steps)
        times.append((time.perf_counter() - t0) / n)
    for r in reqs:
        engine.abort(r.request_id)
    return times


# ---- transformers ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def time_prefill_hf(hf, ids: torch.Tensor, warmup: int, repeat: int) -> list[float]:
    """Seconds per `hf(ids [1, T], use_cache=True, logits_to_keep=1)` (its cache is created inside the call)."""
    times = []
    for r in range(warmup + repeat):
        t0 = time.perf_counter()
        hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def time_decode_hf(hf, ids: torch.Tensor, plan: DecodePlan) -> list[float]:
    """Seconds per single-token cached forward + argmax, after prefilling ids [B, P] with use_cache=True."""
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.cache

    def step(tok: torch.Tensor, _: int) -> torch.Tensor:
        return hf(input_ids=tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    return _timed_steps(step, out.logits[:, -1].argmax(-1, keepdim=True), plan)


# ---- memory bandwidth ------------------------------------------------------------------------------------------------
def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache from sysfs (Linux), or None."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:].upper(), 1)
        digits = size[:-1] if size[-1:].isalpha() else size
        if digits.isdigit():
            best = max(best or 0, int(digits) * mult)
    return best


def measure_bandwidth(nbytes: int, repeat: int = 5) -> dict[str, float]:
    """Memory bandwidth in GB/s (1e9 bytes) at the current torch thread count, medians of `repeat` passes over a
    float32 buffer of `nbytes`: "read" = `sum()` (bytes read), "copy" = `copy_()` (bytes read + written)."""
    n = max(nbytes // 4, 1024)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    reads, copies = [], []
    for r in range(repeat + 1):  # the first pass of each only faults the pages in
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        if r:
            reads.append(t1 - t0)
            copies.append(t2 - t1)
    b = n * 4
    return {"read_gb_s": b / statistics.median(reads) / 1e9, "copy_gb_s": 2 * b / statistics.median(copies) / 1e9,
            "buffer_bytes": b, "repeat": repeat}
