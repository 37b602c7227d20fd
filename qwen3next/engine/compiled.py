"""The torch.compile'd decode step, owned by the runner (the model stays a plain module).

Decode steps (one new token per sequence, with a cache, no autograd) run the decoder stack through `torch.compile`;
prefill and everything else stay eager. Opt-in: compiling takes a while (~20-60 s per graph on 2 cores: one for
batch 1, one more once the context length varies, one once the batch size does) and needs a C++ compiler. Measured
on an AVX2 EPYC, 2 threads: `small` decode steps 1.7x (batch 1) and 1.9x (batch 8) faster than the eager fast paths;
`tiny` ~1.3 ms vs ~4.2 ms per step.

Decode steps of up to 8 sequences run through the same graph compiled ahead of time by AOTInductor (aot_step.py: no
dynamo guards, no Python between kernels; ~20% faster per step on `small`), built on first use and cached on disk;
`QWEN3NEXT_AOT=0` keeps every step on torch.compile.

The compiled graph reads the cache through index tensors only (`BatchInfo.prepare(views=False)`), so slot and block
layouts do not multiply the graphs. `warm_up(cache)` compiles before serving.

With speculative decoding (`verify_tokens` = 1 + the most drafts), verifications where every sequence feeds exactly
that many tokens (up to 8 rows) run through an ahead-of-time verification program, and the commit of the accepted
states plus the MTP head's drafting through a second one (aot_step.py: AOTVerifyStep, AOTDraftStep); with the
ahead-of-time programs off or failing, a batch-1 verification and the MTP head's forwards are torch.compile'd
instead. Other verifications (fewer drafts, varlen) run eagerly; the adaptive draft length sees what they cost.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from .. import kernels
from ..model.batch import BatchInfo, ForwardContext
from ..model.cache import HybridCache, SequenceCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..ops.dispatch import enabled, fast_decode, switch_state
from .aot_step import MAX_BATCH, AOTDecodeStep, AOTDraftStep, AOTStepError, AOTVerifyStep


def layout_key(cache: HybridCache) -> tuple:
    """What an ahead-of-time step built for one cache needs to be the same in another to serve it: dtypes, block size
    (baked into the graph's row arithmetic) and pool keys (pool sizes are dynamic); and what the process switched
    since (the kernels, the fast-path switches and thresholds, one thread or several), which the trace depends on."""
    return (cache.dtype, cache.kv_dtype, cache.state_dtype, cache.block_size, tuple(cache.k), tuple(cache.state),
            switch_state(), torch.get_num_threads() > 1)


class CompileDecodeError(RuntimeError):
    """torch.compile of the decode step failed on this machine (no C++ compiler, unsupported op, ...)."""


class CompiledDecoder:
    def __init__(self, model: Qwen3NextForCausalLM, verify_tokens: int = 0,
                 log_fn: Callable[[str], None] | None = None, draft_head: torch.nn.Module | None = None,
                 draft_mtp: torch.nn.Module | None = None):
        """`draft_head`: what the drafting program computes the drafts' logits with (runner.make_draft_head;
        default `lm_head`); `draft_mtp`: the MTP layer drafts run through (runner.make_draft_mtp; default
        `model.mtp`)."""
        import torch._dynamo.config

        # Graphs are cached per code object, shared by every model in the process (a float model and its quantized
        # copy, several batch sizes...); past the default limit of 8, dynamo silently runs eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.model, self.draft_head = model, draft_head
        self._on_cpu = model.device.type == "cpu"
        self.draft_mtp = draft_mtp if draft_mtp is not None else model.mtp
        self.verify_tokens = verify_tokens if model.mtp is not None else 0
        if self._on_cpu:
            kernels.available()  # build / load the native kernels now: the traced step can then call them
        self._stack = torch.compile(model.model.forward)
        self._aot: dict[tuple, object] = {}  # ahead-of-time programs per (kind, cache pool layout, shape)
        self._aot_errors: dict[tuple, str] = {}
        self._aot_lock = threading.Lock()
        self._log = log_fn
        self._mtp = torch.compile(self.draft_mtp.forward) if self.verify_tokens else None

    @staticmethod
    def handles(batch: BatchInfo) -> bool:
        """Whether a forward over `batch` (with a cache) takes the compiled step: a decode step, fast paths on."""
        return (fast_decode() and all(n == 1 for n in batch.seq_lens) and not batch.capture_states
                and not batch.snapshots)

    def handles_verify(self, batch: BatchInfo) -> bool:
        """Whether a speculative verification over `batch` takes the compiled graph (see the module docstring)."""
        return (fast_decode() and self.verify_tokens > 1 and batch.capture_states
                and batch.seq_lens == [self.verify_tokens])

    def handles_mtp(self, ctx: ForwardContext) -> bool:
        """Whether the MTP head's forward over `ctx`'s batch takes a compiled graph: one sequence, one drafted
        position or a compiled verification's positions, a context built without views."""
        lens = ctx.batch.seq_lens
        return (self._mtp is not None and fast_decode() and ctx.batch.kv is not None and ctx.batch.kv.view is None
                and lens in ([1], [self.verify_tokens]))

    def hidden_states(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache) -> torch.Tensor:
        """Flat tokens [B] of a decode step -> final normed hidden states [B, D]. Steps of up to
        `aot_step.MAX_BATCH` sequences run through the ahead-of-time library when it is on and builds
        (engine/aot_step.py), the others through torch.compile."""
        return self.decode(tokens, batch, cache)[0]

    def decode(self, tokens: torch.Tensor, batch: BatchInfo,
               cache: HybridCache) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`hidden_states`, and the logits of every row [B, V] fp32 and their argmax [B] when the ahead-of-time
        step computed them (it runs the LM head too), else None, None."""
        step = self.aot_step(cache) if AOTDecodeStep.handles(batch) else None
        if step is not None:
            return step.run(tokens, batch, cache)
        return self.forward(tokens, batch, cache)[0], None, None

    def decode_steps(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache, n: int,
                     keep_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`n` greedy decode steps in a row from tokens [B] of a decode step `batch` (its blocks hold n more
        tokens), each feeding the argmax of the one before -> (the picked tokens [n, B], the steps' hidden states
        [n, B, D] with `keep_hidden`); through the ahead-of-time step (`AOTDecodeStep.run_steps`). None when that
        step does not take `batch` (the caller steps itself)."""
        step = self.aot_step(cache) if AOTDecodeStep.handles(batch) else None
        return step.run_steps(tokens, batch, cache, n, keep_hidden) if step is not None else None

    def forward(self, tokens: torch.Tensor, batch: BatchInfo,
                cache: HybridCache) -> tuple[torch.Tensor, ForwardContext]:
        """Flat tokens of a decode step or a compiled verification -> (final normed hidden states, the context,
        holding a verification's captured states), through torch.compile."""
        ctx = self.model.context(batch, cache, views=False)
        return self._stack(self.model.model.embed_tokens(tokens), ctx), ctx

    def aot_step(self, cache: HybridCache) -> AOTDecodeStep | None:
        """The ahead-of-time decode step for `cache`'s pool layout: built (or loaded from the disk cache) on first
        use; None when switched off (QWEN3NEXT_AOT=0) or when it cannot be built here (a warning says why, once, and
        the steps stay on torch.compile)."""
        return self._aot_program(AOTDecodeStep, cache)

    def aot_verify(self, batch: BatchInfo, cache: HybridCache) -> AOTVerifyStep | None:
        """The ahead-of-time verification of `verify_tokens` tokens per sequence, when `batch` is one it serves
        (every sequence verifying that many tokens, at most aot_step.max_verify_batch of them)."""
        if self.verify_tokens < 2 or not batch.capture_states:
            return None
        program = self._aot_program(AOTVerifyStep, cache, T=self.verify_tokens)
        return program if program is not None and program.handles(batch) else None

    def aot_draft(self, cache: HybridCache) -> AOTDraftStep | None:
        """The ahead-of-time commit + MTP drafting (verify_tokens - 1 drafts) after an ahead-of-time verification."""
        if self.verify_tokens < 2:
            return None
        return self._aot_program(AOTDraftStep, cache, T=self.verify_tokens, K=self.verify_tokens - 1)

    def _aot_program(self, cls, cache: HybridCache, **shape):
        if not enabled("aot_decode_step") or not self._on_cpu:  # a GPU's steps: torch.compile alone
            return None
        key = (cls.kind, layout_key(cache), tuple(sorted(shape.items())))
        program = self._aot.get(key)
        if program is None and key not in self._aot_errors:
            with self._aot_lock:
                if key in self._aot or key in self._aot_errors:
                    return self._aot.get(key)
                try:
                    # the draft head is fixed per decoder; only the drafting program reads it
                    program = self._aot[key] = cls(self.model, cache, log_fn=self._log, draft_head=self.draft_head,
                                                   draft_mtp=self.draft_mtp, **shape)
                except AOTStepError as e:
                    self._aot_errors[key] = str(e)
                    warnings.warn(f"{e}; these steps stay on torch.compile", RuntimeWarning, stacklevel=3)
        return program

    def mtp_hidden(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """`model.mtp_hidden` (with `draft_mtp`) through the compiled graph (when `handles_mtp(ctx)`)."""
        return self._mtp(hidden, self.model.model.embed_tokens(next_tokens), ctx)

    @torch.no_grad()
    def decode_logits(self, input_ids: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
        """`model(input_ids, cache)` for one token per sequence ([B, 1] -> logits [B, 1, vocab]), compiled."""
        B = input_ids.shape[0]
        rows, ones = list(range(B)), [1] * B
        hidden, logits, _ = self.decode(input_ids.reshape(-1), cache.batch(rows, ones), cache.hybrid)
        cache.advance(rows, ones)
        return (logits if logits is not None else self.model.lm_head(hidden)).view(B, 1, -1)

    @torch.no_grad()
    def greedy_steps(self, input_ids: torch.Tensor, cache: SequenceCache, n: int) -> torch.Tensor:
        """`n` greedy decode steps from the last tokens input_ids [B, 1] -> the tokens picked [B, n]: one run through
        `decode_steps` (the engine's multi-step decoding) where the ahead-of-time step takes it, else step by step."""
        B = input_ids.shape[0]
        rows, ones = list(range(B)), [1] * B
        cache.batch(rows, [n] * B)  # ValueError past the cache's capacity
        run = self.decode_steps(input_ids.reshape(-1), cache.batch(rows, ones), cache.hybrid, n)
        if run is not None:
            cache.advance(rows, [n] * B)
            return run[0].t()
        out, tok = [], input_ids
        for _ in range(n):
            tok = self.decode_logits(tok, cache)[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, 1)

    @torch.no_grad()
    def warm_up(self, cache: HybridCache) -> None:
        """Compile the decode graphs now, on `cache` (the one that will be used: its pool sizes are part of the
        graph): batch 1 at two context lengths, then batches 2 and 3 (a size that changes from 1 stays specialised,
        so it takes a second change before the batch size becomes dynamic), then 9 if the cache has room (the CPU
        attention kernel adds a guard at 8). With the ahead-of-time step (built or loaded here first), which takes
        every step of up to 8 sequences, only batches 9 and 10 are compiled (two context lengths). Uses the first
        slots and blocks and zeroes those slots' DeltaNet state afterwards. With `verify_tokens`, also a
        verification of that many tokens and the MTP head's forwards (batch 1, two context lengths). Raises
        CompileDecodeError naming the cause if torch.compile fails."""
        if cache.num_slots < 2 or cache.num_blocks < 2 or cache.block_size < 4:
            raise ValueError("CompiledDecoder.warm_up: the cache needs at least 2 slots and 2 blocks of >= 4 tokens")
        room = min(cache.num_slots, cache.num_blocks)
        plan = [(1, 1), (1, 2)] + [(b, b) for b in (2, 3, 9) if b <= room]
        if self.aot_step(cache) is not None:  # steps of <= MAX_BATCH sequences take it: compile only the larger ones
            big = MAX_BATCH + 1
            plan = [(b, c) for b, c in ((big, 1), (big, 2), (big + 1, 2)) if b <= room]
        largest = max((b for b, _ in plan), default=1)
        try:
            for batch_size, context in plan:
                batch = BatchInfo([1] * batch_size, [context] * batch_size, list(range(batch_size)),
                                  [[i] for i in range(batch_size)])
                tokens = torch.zeros(batch_size, dtype=torch.long, device=self.model.device)
                self.hidden_states(tokens, batch, cache)
            T = self.verify_tokens
            if T > 1 and self.aot_draft(cache) is not None and self._aot_program(AOTVerifyStep, cache, T=T):
                T = 0  # verifications of T tokens and their drafting take the ahead-of-time programs
            for context in ((1, 2) if T > 1 else ()):
                blocks = [0, 1] if context + T > cache.block_size else [0]
                batch = BatchInfo([T], [context], [0], [blocks], capture_states=True)
                tokens = torch.zeros(T, dtype=torch.long, device=self.model.device)
                hidden, ctx = self.forward(tokens, batch, cache)
                self.mtp_hidden(hidden, tokens, ctx)
                step = self.model.context(BatchInfo([1], [context + 1], [0], [blocks]), cache, views=False)
                self.mtp_hidden(hidden[:1], tokens[:1], step)
        except Exception as e:  # inductor raises many types; any of them means "compiled decode unavailable here"
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise CompileDecodeError(f"compile_decode: torch.compile failed on this machine ({type(e).__name__}: "
                                     f"{first}); decoding stays eager") from e
        finally:
            cache.zero_slots(list(range(largest)))
