"""The decode step on a CUDA GPU as CUDA graphs: the whole step's kernels launched by one call.

On a GPU the eager decode step of a small model is bound by the host, not the device: the profile of `small` at
batch 1 (README, "On a GPU") showed ~1.3 ms of GPU time in a ~14 ms step, ~870 kernel launches each paying Python,
dispatcher and launch costs. A CUDA graph records those launches once and replays them with one call.

What is captured: the step program of the ahead-of-time CPU step (`aot_step._StepModule`: embedding -> decoder stack
-> final norm -> LM head -> argmax, so the runner's plain greedy rows need no launch after the replay), whose
inputs are tensors only (tokens, context lengths, slots, padded block tables, `arange(L)`) and which derives
positions, the K/V rows written and read, and RoPE inside; attention reads its K/V rows per query through
`attention.attention_over_rows` (SDPA with a key mask), the MoE experts take their sync-free gathered form
(`ops.dispatch.sync_free`). Every shape in it is fixed by the batch size B and the key count L, so there is one graph
per (B, W): B exactly (1..`max_batch`), W = block-table width rounded up to a power of two (at least `MIN_KEYS` keys,
at most the model length: a step attends L = W x block_size keys, the ones past each sequence's own masked), up to
`max_len` keys (vLLM's `max_seq_len_to_capture`, 8,192 by default); longer contexts and larger batches run the step
eagerly. With `compile_decode` the captured program is the torch.compile'd step (fused kernels, fewer launches).

With speculative decoding (MTP, k drafts, T = k + 1), two more programs of the ahead-of-time CPU step are captured
the same way, per (B, W): the verification of T tokens per sequence (`GraphVerify`: `aot_step._VerifyModule`, every
DeltaNet state after every token captured, nothing committed) and the commit of the accepted states + the MTP
head's drafting after sampling (`GraphDraft`: `aot_step._DraftModule`), with the interfaces of the ahead-of-time
programs, so that the runner drives them alike. Shorter verifications, grammars and the gaps of steps without
drafting stay eager (the engine then drafts k tokens or none, as with a compiled decoder).

A graph is captured the first time its (B, W) is needed: the step is run once eagerly on a side stream (cuBLAS and
cuDNN set themselves up, torch.compile compiles) - that run IS the step being served, so its result is returned -
then recorded (recording executes nothing). Later steps copy their inputs into the graph's static tensors and replay.
All graphs share one memory pool. The cache pools are read and written in place, at fixed addresses.

Switched off with `enforce_eager` (vLLM's name: `Engine(..., enforce_eager=True)`, `--enforce-eager`). Models the
capture cannot serve (int4 experts, whose GPU form waits on the device per expert) keep eager steps; a capture that
fails anyway leaves every step eager with one warning. Memory: each graph keeps its static inputs and outputs (a
few rows of hidden size; the verification's also the captured DeltaNet states), its temporaries come from the shared
pool. Twin: the eager step (`Qwen3NextForCausalLM.hidden_states`), compared in tests/test_cuda.py (hidden states,
every cache pool, engines' greedy tokens, MTP's too) and, for the bucketing and static inputs, on the CPU in
tests/test_cuda_graph.py (the capture replaced by re-running the program).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..model.batch import BatchInfo
from ..model.cache import HybridCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..ops.dispatch import fast_decode, sync_free_scope
from ..quant.experts import QuantizedExperts
from .aot_step import _programs, _StepModule, _VerifyModule, drafts_fit, pool_names, pool_tensors

MAX_CAPTURE_LEN = 8192  # keys; vLLM's max_seq_len_to_capture default
MIN_KEYS = 256  # the smallest key bucket: short contexts share one graph per batch size
MAX_CAPTURE_BATCH = 64


def graph_blocker(model: Qwen3NextForCausalLM) -> str | None:
    """Why the decode step of `model` cannot be captured in a CUDA graph, or None."""
    for name, module in model.model.named_modules():
        if isinstance(module, QuantizedExperts) and module.bits == 4:
            return f"int4 experts ({name}) group their tokens by expert on the host"
    return None


class _Graph:
    """One program captured at one shape: its static inputs (`static`, refilled before every replay; `args`, the
    program's arguments, views of them), the recorded graph and its outputs."""

    def __init__(self, static: dict[str, torch.Tensor], args: tuple[torch.Tensor, ...], program: Callable,
                 pools: list[torch.Tensor]):
        self.static, self.args, self.program, self.pools = static, args, program, pools
        self.graph = None  # torch.cuda.CUDAGraph once recorded
        self.outs: tuple[torch.Tensor, ...] = ()

    def run(self) -> tuple[torch.Tensor, ...]:
        """The program over the static inputs and the cache pools (eagerly, or recorded under a capture)."""
        out = self.program(*self.args, *self.pools)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class CUDAGraphDecoder:
    """Decode steps of up to `max_batch` sequences with up to `max_len` keys through CUDA graphs (module docstring).
    `compile`: capture the torch.compile'd programs instead of the eager ones. `verify_tokens` T > 1 (speculative
    decoding with T - 1 drafts): also the verification of T tokens per sequence (`verifier`) and the commit + MTP
    drafting after it (`drafter`), with `draft_head` / `draft_mtp` (runner.make_draft_head / make_draft_mtp)."""

    def __init__(self, model: Qwen3NextForCausalLM, cache: HybridCache, max_batch: int, max_len: int,
                 compile: bool = False, verify_tokens: int = 0, draft_head: torch.nn.Module | None = None,
                 draft_mtp: torch.nn.Module | None = None, log_fn: Callable[[str], None] | None = None):
        self.block_size = cache.block_size
        self.max_batch = min(max_batch, MAX_CAPTURE_BATCH)
        self.max_blocks = -(-min(max_len, MAX_CAPTURE_LEN) // cache.block_size)
        self.min_blocks = max(1, -(-MIN_KEYS // cache.block_size))
        kv_keys, state_keys = pool_names(cache, model)
        self.pools = pool_tensors(cache, kv_keys, state_keys)

        def program(module: torch.nn.Module) -> Callable:
            return torch.compile(module) if compile else module

        self.step = program(_StepModule(model, kv_keys, state_keys, cache.block_size))
        self.verifier: GraphVerify | None = None
        self.drafter: GraphDraft | None = None
        T = verify_tokens if model.mtp is not None and "mtp0" in cache.k else 0
        if T > 1:
            verify = _VerifyModule(model, kv_keys, state_keys, cache.block_size, T)
            self.verifier = GraphVerify(self, program(verify), T, state_keys)
            draft, mtp_keys, _ = _programs(model, cache, "draft", T, T - 1, draft_head, draft_mtp)
            self.drafter = GraphDraft(self, program(draft), T, T - 1, pool_tensors(cache, mtp_keys, state_keys))
        self.graphs: dict[tuple, _Graph] = {}  # (program, sequences, block-table width) -> its graph
        self.error: str | None = graph_blocker(model)  # once set, every step stays eager
        self.captures = self.replays = 0
        self._pool = None  # the graphs' shared memory pool
        self._log = log_fn

    def width(self, keys: int) -> int | None:
        """The block-table width W of the graph for steps attending up to `keys` keys, or None when too long."""
        need = -(-keys // self.block_size)
        if need > self.max_blocks:
            return None
        w = self.min_blocks
        while w < need:
            w *= 2
        return min(w, self.max_blocks)  # a model length that is not a power of two of blocks: its own last bucket

    def handles(self, batch: BatchInfo) -> bool:
        """Whether the decode step `batch` (one new token per sequence, nothing captured or snapshotted) runs
        through a graph: graphs usable, fast paths on, at most max_batch sequences of at most max_len keys."""
        return (self.error is None and fast_decode() and batch.context_lens is not None
                and 1 <= len(batch.seq_lens) <= self.max_batch and all(n == 1 for n in batch.seq_lens)
                and not batch.capture_states and not batch.snapshots
                and self.width(max(batch.context_lens) + 1) is not None)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch: BatchInfo,
               cache: HybridCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat tokens [B] of a decode step (`handles(batch)`) -> (final normed hidden states [B, D], their logits
        [B, V] fp32, the logits' argmax [B]): new tensors, the graph's outputs are overwritten by its next replay."""
        B, W = len(batch.seq_lens), self.width(max(batch.context_lens) + 1)
        key = ("step", B, W)
        g = self.graphs.get(key)
        if g is None:
            static = self.index_inputs(B, W, tokens.device)
            static["tokens"] = torch.zeros(B, dtype=torch.long, device=tokens.device)
            g = _Graph(static, (static["tokens"], *_index_args(static, B, W)), self.step, self.pools)
        self.fill_index(g, batch)
        g.static["tokens"].copy_(tokens)
        hidden, logits, argmax = self.launch(g, key)
        return hidden, logits, argmax

    # ---- what the programs share ---------------------------------------------------------------------------------
    def index_inputs(self, B: int, W: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Static context lengths, slots and block tables ([B], [B], [B, W], one buffer filled by one copy) and the
        key positions arange(W x block_size)."""
        return {"ints": torch.zeros(B * (2 + W), dtype=torch.long, device=device),
                "key_pos": torch.arange(W * self.block_size, device=device)}

    def fill_index(self, g: _Graph, batch: BatchInfo) -> None:
        """Copy `batch`'s context lengths, slots and block tables (padded with block 0) into `g`'s static inputs."""
        ints = g.static["ints"]
        B = len(batch.context_lens)
        W = (ints.shape[0] - 2 * B) // B
        flat = list(batch.context_lens) + list(batch.slots)
        for table in batch.block_tables:
            flat += table[:W] + [0] * (W - len(table[:W]))
        ints.copy_(torch.tensor(flat, dtype=torch.long))

    def launch(self, g: _Graph, key: tuple) -> tuple[torch.Tensor, ...]:
        """Replay `g` (captured under `key`), or capture it now: -> its outputs (new tensors)."""
        if g.graph is not None:
            g.graph.replay()
            self.replays += 1
            return tuple(o.clone() for o in g.outs)
        return self._capture(g, key)

    def _capture(self, g: _Graph, key: tuple) -> tuple[torch.Tensor, ...]:
        """Run `g`'s program once (this step's result), then record it; on a failed recording, switch graphs off."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # lazy set-ups (cuBLAS handles, cuDNN plans, compiling) outside the capture, with the kernels it will record
        with torch.cuda.stream(side), sync_free_scope():
            outs = g.run()
        torch.cuda.current_stream().wait_stream(side)
        result = tuple(o.clone() for o in outs)  # on the step's own stream, after the side stream's work
        del outs
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), sync_free_scope():
                recorded = g.run()
        except Exception as e:  # any failure to record means "eager steps here"; the step above already ran
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            self.error = f"CUDA graph capture failed ({type(e).__name__}: {first})"
            warnings.warn(f"{self.error}; decode steps stay eager", RuntimeWarning, stacklevel=4)
            return result
        g.graph, g.outs = graph, recorded
        self.graphs[key] = g
        self.captures += 1
        if self._log is not None:
            self._log(f"captured the {key[0]} program for {key[1]} sequences x {key[2] * self.block_size} keys")
        return result


class GraphVerify:
    """The speculative verification of T tokens per sequence as CUDA graphs (`aot_step._VerifyModule`: every
    DeltaNet state after every token captured, nothing committed), with AOTVerifyStep's interface:
    `run(tokens, batch, cache)` -> (hidden states [B * T, D], the captured states in `state_keys` order, the
    logits [B * T, V] fp32, their argmax [B * T])."""

    def __init__(self, owner: CUDAGraphDecoder, program: Callable, T: int, state_keys: list[tuple[str, str]]):
        self.owner, self.program, self.T, self.state_keys = owner, program, T, state_keys

    def handles(self, batch: BatchInfo) -> bool:
        o = self.owner
        return (o.error is None and fast_decode() and batch.capture_states and not batch.snapshots
                and batch.context_lens is not None and 1 <= len(batch.seq_lens) <= o.max_batch
                and all(n == self.T for n in batch.seq_lens) and o.width(max(batch.context_lens) + self.T) is not None)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, batch: BatchInfo,
            cache: HybridCache) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        o, B = self.owner, len(batch.seq_lens)
        W = o.width(max(batch.context_lens) + self.T)
        key = ("verify", B, W)
        g = o.graphs.get(key)
        if g is None:
            static = o.index_inputs(B, W, tokens.device)
            static["tokens"] = torch.zeros(B * self.T, dtype=torch.long, device=tokens.device)
            g = _Graph(static, (static["tokens"], *_index_args(static, B, W)), self.program, o.pools)
        o.fill_index(g, batch)
        g.static["tokens"].copy_(tokens)
        hidden, logits, argmax, *captured = o.launch(g, key)
        return hidden, captured, logits, argmax


class GraphDraft:
    """The commit of the accepted states + the MTP head's drafting after a graph verification, as CUDA graphs
    (`aot_step._DraftModule`), with AOTDraftStep's interface: `run(...)` -> drafts [B, K]."""

    def __init__(self, owner: CUDAGraphDecoder, program: Callable, T: int, K: int, pools: list[torch.Tensor]):
        self.owner, self.program, self.T, self.K, self.pools = owner, program, T, K, pools

    def handles(self, batch: BatchInfo, keep: list[int]) -> bool:
        """Whether the drafts after `batch`'s verification (keeping keep[b] tokens of sequence b) fit: graphs usable
        and every sequence's blocks hold its drafted positions (`aot_step.drafts_fit`)."""
        o = self.owner
        return (o.error is None and o.width(max(batch.context_lens) + self.T + self.K - 1) is not None
                and drafts_fit(batch, keep, self.K, o.block_size))

    @torch.no_grad()
    def run(self, hidden: torch.Tensor, tokens: torch.Tensor, bonus: list[int], keep: list[int], batch: BatchInfo,
            captured: list[torch.Tensor], cache: HybridCache) -> torch.Tensor:
        o, B = self.owner, len(batch.seq_lens)
        W = o.width(max(batch.context_lens) + self.T + self.K - 1)
        key = ("draft", B, W)
        g = o.graphs.get(key)
        if g is None:
            static = o.index_inputs(B, W, tokens.device)
            static["hidden"] = torch.zeros_like(hidden)
            static["tokens"] = torch.zeros_like(tokens)
            static["bonus_keep"] = torch.zeros(2 * B, dtype=torch.long, device=tokens.device)
            static["captured"] = [torch.zeros_like(c) for c in captured]
            args = (static["hidden"], static["tokens"], static["bonus_keep"][:B], static["bonus_keep"][B:],
                    *_index_args(static, B, W), *static["captured"])
            g = _Graph(static, args, self.program, self.pools)
        o.fill_index(g, batch)
        g.static["hidden"].copy_(hidden)
        g.static["tokens"].copy_(tokens)
        g.static["bonus_keep"].copy_(torch.tensor(list(bonus) + list(keep), dtype=torch.long))
        for dst, src in zip(g.static["captured"], captured):
            dst.copy_(src)
        return o.launch(g, key)[0]


def _index_args(static: dict, B: int, W: int) -> tuple[torch.Tensor, ...]:
    """(context lengths [B], slots [B], block tables [B, W], key positions): views of `static`'s index inputs."""
    ints = static["ints"]
    return ints[:B], ints[B:2 * B], ints[2 * B:].view(B, W), static["key_pos"]
