"""The one place the engine touches tensors: owns the model, the hybrid cache and the compiled decoder, and runs
a scheduled batch: slot operations, one forward, one sampling batch, the prompt logprobs of the prefill chunks
that ask for them; with speculative decoding also the verification of the drafts, the commit of the accepted states
and the MTP head's next drafts."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels
from ..model.batch import BatchInfo, ForwardContext
from ..model.cache import HybridCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..ops.dispatch import fast_decode
from ..ops.hugepages import place_weights
from ..parallel.comm import TPComm
from ..quant.linear import Int8Linear
from .memory import CacheGeometry, CachePlan
from .sampler import SampleOutput, SamplingBatch, sample
from .scheduler import ScheduledBatch
from .speculative import accepted_run
from .structured import allowed_mask, words_per_row


def cache_geometry(model: Qwen3NextForCausalLM, block_size: int, include_mtp: bool = False,
                   kv_dtype: torch.dtype | None = None) -> CacheGeometry:
    """Bytes per KV token and per DeltaNet state slot, as `HybridCache` will allocate them for this model (with the
    MTP layer's K/V when `include_mtp`; K/V in `kv_dtype`, None: the activation dtype)."""
    layout = model.cache_layout(include_mtp=include_mtp)
    elem = torch.empty((), dtype=model.dtype).element_size()
    kv_elem = torch.empty((), dtype=kv_dtype).element_size() if kv_dtype is not None else elem
    return CacheGeometry(kv_bytes_per_token=layout.kv_bytes_per_token(kv_elem),
                         state_bytes_per_slot=layout.state_bytes_per_slot(elem, 4), block_size=block_size)


def draft_head_kind(model: Qwen3NextForCausalLM, choice: str | None, tp: TPComm | None) -> str:
    """What the MTP drafts' logits (and MTP layer) are computed with (SpeculativeConfig.draft_head): "target" ->
    the model's own `lm_head` and MTP layer; "int8" -> int8 copies of them; None -> "int8" for a float `lm_head` on a
    CPU with the native kernels and without tensor parallelism, else "target". ValueError for "int8" where it
    cannot be made."""
    head = model.lm_head
    floating = isinstance(head, nn.Linear) and head.weight.is_floating_point() and head.bias is None
    if choice == "target" or (choice is None and not (floating and tp is None and model.device.type == "cpu"
                                                      and kernels.available())):
        return "target"
    if tp is not None:
        raise ValueError("speculative_config: draft_head 'int8' is not supported with tensor parallelism")
    if not floating:
        raise ValueError(f"speculative_config: draft_head 'int8' quantizes a float lm_head; this model's is "
                         f"{type(head).__name__} (already quantized: use 'target')")
    return "int8"


def make_draft_head(model: Qwen3NextForCausalLM, kind: str, token_map: list[int] | None = None,
                    tp: TPComm | None = None) -> nn.Module:
    """The module the MTP drafts' logits come from: `model.lm_head` ("target") or an int8 copy of it ("int8": per-row
    scales, the native kernel where it runs; `vocab x hidden` bytes more), see `draft_head_kind`; with `token_map`
    (token ids) only those rows, wrapped so that the logits keep the vocabulary's width (draft_vocab.py). A draft
    only proposes a token, so this changes what drafting costs and which drafts come, never the output. Measured
    on the demo model (fp32, 1 thread): one draft's `lm_head` 0.43 ms -> ~0.1 ms in int8."""
    head = model.lm_head
    if token_map is not None:
        if tp is not None:
            raise ValueError("speculative_config: speculative_token_map is not supported with tensor parallelism "
                             "(the vocabulary is split over the ranks)")
        from .draft_vocab import DraftVocabHead, head_rows

        ids = torch.tensor(token_map, dtype=torch.long, device=model.device)
        rows = head_rows(head, ids)
        return DraftVocabHead(Int8Linear.from_linear(rows) if kind == "int8" else rows, ids, model.config.vocab_size)
    return Int8Linear.from_linear(head) if kind == "int8" else head


def make_draft_mtp(model: Qwen3NextForCausalLM, kind: str) -> nn.Module:
    """The MTP layer the drafts run through: for the "int8" kind (`draft_head_kind`), an int8 copy of `model.mtp`
    (its projections and experts per output channel, as `quantize_model` does; the router and gates stay as they
    are), else `model.mtp` itself. Nothing but drafting reads the head (its K/V only feed its own drafts), so this
    changes what drafting costs and, slightly, which drafts come, never the output. Measured on the demo model
    (fp32, 1 thread, compiled, batch 1, real text): the drafting program 0.91 -> 0.68 ms per step. Memory: one byte
    per quantized MTP parameter more (the 80B's MTP layer, 512 experts: ~1.65 GB beside its 3.3 GB in bf16); a
    quantized checkpoint drafts with its own weights."""
    if kind != "int8" or model.mtp is None:
        return model.mtp
    from ..quant.quantize import quantize_module

    # a copy of the module tree sharing every tensor: only the swapped-in int8 modules are new memory
    shared = {id(t): t for t in (*model.mtp.parameters(), *model.mtp.buffers())}
    return quantize_module(copy.deepcopy(model.mtp, memo=shared), 8)


def plain_greedy(seqs: list) -> bool:
    """Whether every one of `seqs` samples its tokens as the argmax of the raw logits: greedy, no penalties, no
    grammar, no logprobs (`sampler.sample` would then do exactly `logits.argmax(-1)`, after building its batch)."""
    return all(s.samples_argmax for s in seqs)


def cuda_graph_steps(device: torch.device, enforce_eager: bool, tp: TPComm | None) -> bool:
    """Whether a runner on `device` takes its decode steps (and MTP's verifications) as CUDA graphs
    (engine/cuda_graph.py): on a GPU, unless `enforce_eager` or tensor-parallel."""
    return device.type == "cuda" and not enforce_eager and tp is None


MAX_MTP_GAP = 1024  # positions kept at least per sequence for the MTP head's K/V (see MTPGap)


@dataclass
class MTPGap:
    """Positions `start`, `start + 1`, ... of `seq` that decode steps without drafting fed through the main model
    but not through the MTP head: the head's inputs there (main hidden states [n, D], the next tokens [n]).

    The head attends over its own K/V at every earlier position, so positions it skipped would be holes that its
    drafts read once drafting resumes (measured on the demo model: the acceptance of the first two drafts fell from
    ~95% / 90% to ~50%, which in turn kept the adaptive length at 0). A bounded cost per sequence (D floats a
    position): once a gap holds 2 x `MAX_MTP_GAP` positions, all but the last `MAX_MTP_GAP` are dropped (trimming
    at once, not at every step past the bound) and stay holes."""

    seq: object
    start: int
    hidden: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def add(self, hidden: torch.Tensor, tokens: list[int]) -> None:
        """Append positions: `hidden` [n, D] must not change afterwards (the caller copies the step's output)."""
        self.hidden.append(hidden)
        self.tokens += tokens
        if len(self.tokens) >= 2 * MAX_MTP_GAP:
            excess = len(self.tokens) - MAX_MTP_GAP
            self.hidden = [torch.cat(self.hidden)[excess:]]
            self.tokens = self.tokens[excess:]
            self.start += excess


@dataclass
class PromptLogprobs:
    """The prompt logprobs of one span of prompt positions, per position: the next prompt token (`token_ids`), its
    logprob and rank (1 = the most likely; tokens as likely count as ahead), and the request's N most likely tokens
    with their logprobs (`top_token_ids` / `top_logprobs`, empty lists for N = 0)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class StepOutput:
    """What one step produced for each entry of `batch.sample_indices`, in that order (`sampled` is None when no
    entry sampled), and one `PromptLogprobs` per span of `batch.prompt_logprob_spans`.

    tokens[j]: the tokens to append (one, or a verification's accepted drafts plus one); rows[j]: the row of
    `sampled` each of them was sampled at (for logprobs); num_drafts[j] / num_accepted[j]: the verification's
    drafts and how many were accepted; drafts[j]: the MTP head's proposals for the next step (empty without
    speculative decoding)."""

    sampled: SampleOutput | None
    tokens: list[list[int]]
    rows: list[list[int]]
    num_drafts: list[int]
    num_accepted: list[int]
    drafts: list[list[int]] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    grammar_seconds: float = 0.0  # spent on the grammars' token masks


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, plan: CachePlan, compile_decode: bool = False,
                 num_speculative_tokens: int = 0, tp: TPComm | None = None, draft_head: str | None = None,
                 enforce_eager: bool = False, draft_token_map: list[int] | None = None,
                 kv_cache_dtype: torch.dtype | None = None):
        """`compile_decode`: run decode steps through a torch.compile'd decoder (see engine/compiled.py), compiled
        here on this cache before any request (raises CompileDecodeError when this machine cannot compile).
        `num_speculative_tokens` > 0: MTP speculative decoding with up to that many drafts (the cache then holds
        the MTP layer's K/V too); with compile_decode, verifications of that many drafts are compiled too.
        `tp`: the model is a tensor-parallel shard (parallel/) and this runner one of the ranks running every step
        together; rank 0 samples and broadcasts its tokens. `draft_head`: what the MTP drafts' logits are computed
        with (`draft_head_kind`); `draft_token_map`: the token ids drafts are restricted to (`make_draft_head`,
        engine/draft_vocab.py). On a CUDA GPU, decode steps run as CUDA graphs (engine/cuda_graph.py) unless
        `enforce_eager` (vLLM's name). `kv_cache_dtype`: the K/V pools' dtype (None: the model's)."""
        if tp is not None and compile_decode:
            raise ValueError("compile_decode: not with tensor_parallel_size > 1 (the compiled step has no collectives)")
        if model.device.type == "cpu":
            place_weights(model)  # the weights on huge pages where the system allows it (ops/hugepages.py)
        self.model, self.tp = model, tp
        self.device = model.device
        # Decode steps without drafting skip the MTP head; the positions they covered are kept here per sequence
        # (id -> MTPGap) and written into the head's K/V when the sequence drafts again (`_fill_mtp_gaps`).
        self._mtp_gaps: dict[int, MTPGap] = {}
        self.draft_grammar_seconds = 0.0  # of the current step's drafting, in grammar masks
        self.speculative = speculative = num_speculative_tokens > 0
        kind = draft_head_kind(model, draft_head, tp) if speculative else None
        self.draft_head = make_draft_head(model, kind, draft_token_map, tp) if speculative else None
        self.draft_mtp = make_draft_mtp(model, kind) if speculative else None
        self.cache = HybridCache(model.config, num_slots=plan.num_slots, num_blocks=plan.num_blocks,
                                 block_size=plan.block_size, dtype=model.dtype, device=model.device,
                                 layout=model.cache_layout(include_mtp=speculative), kv_dtype=kv_cache_dtype)
        self.graphs = None
        self.compiled = None
        # Steps run in inference mode (`execute`), so the decoders are built and traced in it too: torch.compile
        # guards on the inputs' dispatch keys, which inference tensors lack (a trace from outside would recompile).
        with torch.inference_mode():
            if cuda_graph_steps(model.device, enforce_eager, tp):
                from .cuda_graph import CUDAGraphDecoder

                self.graphs = CUDAGraphDecoder(model, self.cache, max_batch=plan.num_seq_slots,
                                               max_len=plan.max_model_len, compile=compile_decode,
                                               verify_tokens=1 + num_speculative_tokens if speculative else 0,
                                               draft_head=self.draft_head, draft_mtp=self.draft_mtp)
            if compile_decode:
                from .compiled import CompiledDecoder

                compiled = CompiledDecoder(model, verify_tokens=1 + num_speculative_tokens if speculative else 0,
                                           draft_head=self.draft_head, draft_mtp=self.draft_mtp)
                if self.graphs is None or self.graphs.error is not None:  # else only what the graphs do not take
                    compiled.warm_up(self.cache)
                self.compiled = compiled

    # Inference mode rather than no_grad: every op skips the autograd and view-tracking dispatch (the native kernels
    # too, which AOTInductor's programs reach through the dispatcher), ~5% of a demo-model decode token through the
    # engine. Tensors made here are inference tensors; the engine keeps them only for later steps, which run here.
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """One forward over the scheduled tokens; samples a token for every entry that needs one (or verifies its
        drafts), computes the prompt logprobs the batch asks for, then, with speculative decoding, runs the MTP head
        over the step's tokens and drafts. A multi-step batch runs its steps in a row (`_multi_step`)."""
        if batch.num_steps > 1:
            return self._multi_step(batch)
        model = self.model
        for op in batch.slot_ops:
            op.apply(self.cache)
        info = BatchInfo(batch.num_new_tokens, batch.context_lens, batch.slots, batch.block_tables,
                         positions=batch.positions, kv_write_rows=batch.kv_write_indices,
                         capture_states=batch.has_drafts,
                         snapshots=None if batch.has_drafts else batch.snapshots or None)  # else: _split_forward's
        tokens = torch.tensor(batch.input_ids, dtype=torch.long, device=self.device)
        ctx, compiled_verify, verified = None, False, list(range(len(batch.entries)))
        aot_verify = self.compiled.aot_verify(info, self.cache) if self.compiled is not None else None
        graph_verify = self.graphs is not None and self.graphs.verifier is not None and aot_verify is None \
            and self.graphs.verifier.handles(info)
        if graph_verify:  # on a GPU: the verification and the drafting after it as CUDA graphs
            aot_verify = self.graphs.verifier
        captured = None  # the ahead-of-time verification's captured states
        logits = argmax = None  # of every row, when the step's program computed them
        decoder = self._decoder(info)
        if decoder is not None:
            hidden, logits, argmax = decoder.decode(tokens, info, self.cache)
        elif aot_verify is not None:  # ahead of time, or the CUDA graph verification
            hidden, captured, logits, argmax = aot_verify.run(tokens, info, self.cache)
        elif self.compiled is not None and self.compiled.handles_verify(info):
            hidden, ctx = self.compiled.forward(tokens, info, self.cache)
            compiled_verify = True
        elif batch.has_drafts and not batch.is_decode_step:
            hidden, ctx, verified = self._split_forward(batch, tokens)
        else:
            ctx = model.context(info, self.cache)
            hidden = model.hidden_states(tokens, ctx)
        out = self._sample(batch, hidden, logits, argmax) if batch.logits_indices else StepOutput(None, [], [], [], [])
        if batch.prompt_logprob_spans:
            out.prompt_logprobs = self._prompt_logprobs(batch, hidden)
        if captured is not None:
            drafts = self._aot_drafts(batch, info, tokens, hidden, captured, out, graph_verify)
            if drafts is not None:
                out.drafts = drafts
                return out
            # not the drafting program's step: commit and draft below, from a context holding the captured states
            ctx = model.context(info, self.cache, views=False)
            ctx.captured = dict(zip(aot_verify.state_keys, captured))
        if ctx is not None and ctx.captures_states:
            sample_of = {b: j for j, b in enumerate(batch.sample_indices)}
            ctx.commit_captured([1 + out.num_accepted[sample_of[b]] for b in verified])
        # Prefill chunks always run the MTP head (its K/V must cover the prompt); decodes only when drafting, the
        # others keep what the head would have read, for when drafting resumes.
        if self.speculative and batch.num_lookahead == 0 and batch.is_decode_step:
            self._keep_mtp_gaps(batch, hidden, out)
        elif self.speculative:
            mtp_ctx = ctx if len(verified) == len(batch.entries) else None  # a split step: one context for all
            self.draft_grammar_seconds = 0.0
            out.drafts = self._mtp(batch, info, mtp_ctx, hidden, out, compiled_verify)
            out.grammar_seconds += self.draft_grammar_seconds
        return out

    def _decoder(self, info: BatchInfo):
        """What takes a decode step over `info`: the CUDA graphs, the compiled decoder (both `decode(tokens, info,
        cache)` -> hidden states, logits, argmax), or None (eager)."""
        if self.graphs is not None and self.graphs.handles(info):
            return self.graphs
        if self.compiled is not None and self.compiled.handles(info):
            return self.compiled
        return None

    def _multi_step(self, batch: ScheduledBatch) -> StepOutput:
        """`batch.num_steps` decode steps in a row for sequences that take their logits' argmax (scheduler.py,
        multi-step decoding): each step feeds the tokens the one before it picked, with the blocks the scheduler
        allocated; the tokens come back to the host once, as one run per entry. On the CPU with the ahead-of-time
        step, the steps run back to back through it (`CompiledDecoder.decode_steps`); otherwise each step is a
        plain decode step (CUDA graph, compiled or eager) over its own batch description."""
        for op in batch.slot_ops:
            op.apply(self.cache)
        B, n = len(batch.entries), batch.num_steps
        if not (batch.is_decode_step and not batch.has_drafts and len(batch.sample_indices) == B
                and plain_greedy(batch.seqs)):
            raise ValueError("a multi-step batch must be plain greedy decode steps of every entry")
        tokens = torch.tensor(batch.input_ids, dtype=torch.long, device=self.device)
        info = BatchInfo([1] * B, batch.context_lens, batch.slots, batch.block_tables)
        keep = self.speculative  # the MTP head's inputs at the steps' positions (MTPGap)
        run = None
        if self.graphs is None and self.compiled is not None:
            run = self.compiled.decode_steps(tokens, info, self.cache, n, keep_hidden=keep)
        if run is None:
            rows, states = [], []
            for i in range(n):
                step = BatchInfo([1] * B, [c + i for c in batch.context_lens], batch.slots, batch.block_tables)
                decoder = self._decoder(step)
                if decoder is not None:  # the argmax is None where torch.compile's step ran (no LM head in it)
                    hidden, _, argmax = decoder.decode(tokens, step, self.cache)
                else:
                    hidden, argmax = self.model.hidden_states(tokens, self.model.context(step, self.cache)), None
                tokens = argmax if argmax is not None else self.model.lm_head(hidden).float().argmax(-1)
                rows.append(tokens)
                if keep:
                    states.append(hidden)
            run = torch.stack(rows), torch.stack(states) if keep else None
        picked, hidden = run
        runs = picked.t().tolist()  # [B, n]
        if keep:
            self._drop_finished_gaps()
            for b, e in enumerate(batch.entries):
                self._keep_mtp_gap(e.seq, batch.context_lens[b], hidden[:, b].clone(), runs[b])
        return StepOutput(None, runs, [list(range(n))] * B, [0] * B, [0] * B)

    def _aot_drafts(self, batch: ScheduledBatch, info: BatchInfo, tokens: torch.Tensor, hidden: torch.Tensor,
                    captured: list[torch.Tensor], out: StepOutput, graphs: bool = False) -> list[list[int]] | None:
        """After an ahead-of-time verification (every entry verifying, in entry order): commit each sequence's
        state after its last kept token and draft `num_lookahead` tokens in one ahead-of-time call (the CUDA-graph
        drafting after a graph verification: `graphs`). None when the drafting program does not serve the step (no
        drafts asked for, a grammar, lookahead blocks not allocated): nothing is done then."""
        K = batch.num_lookahead
        keep = [1 + a for a in out.num_accepted]
        draft = None if K == 0 else self.graphs.drafter if graphs else self.compiled.aot_draft(self.cache)
        if (draft is None or not draft.handles(info, keep)
                or any(batch.entries[i].seq.grammar is not None or id(batch.entries[i].seq) in self._mtp_gaps
                       for i in batch.sample_indices)):  # grammars, and the gaps' filling: the eager path
            return None
        bonus = [run[-1] for run in out.tokens]
        return [d[:K] for d in draft.run(hidden, tokens, bonus, keep, info, captured, self.cache).tolist()]

    def _split_forward(self, batch: ScheduledBatch,
                       tokens: torch.Tensor) -> tuple[torch.Tensor, ForwardContext, list[int]]:
        """A step with prefill chunks and verifications: the state capture is for a few tokens per sequence, so the
        prefill chunks run as one forward and the decode entries (with their drafts) as another. Returns the
        hidden states in the batch's token order, the verification's context and its entries."""
        model, qsl = self.model, batch.query_start_loc
        decodes = batch.decode_entries
        prefills = [b for b in range(len(batch.entries)) if b not in set(decodes)]
        hidden, verify_ctx = None, None
        at = {b: j for j, b in enumerate(prefills)}
        snapshots = [(at[b], m, slot) for b, m, slot in batch.snapshots]  # prefill chunks only take snapshots
        for group, capture in ((prefills, False), (decodes, True)):
            rows = [i for b in group for i in range(qsl[b], qsl[b + 1])]
            sub = BatchInfo([batch.num_new_tokens[b] for b in group], [batch.context_lens[b] for b in group],
                            [batch.slots[b] for b in group], [batch.block_tables[b] for b in group],
                            positions=[batch.positions[i] for i in rows],
                            kv_write_rows=[batch.kv_write_indices[i] for i in rows], capture_states=capture,
                            snapshots=None if capture else snapshots or None)
            idx = torch.tensor(rows, dtype=torch.long, device=tokens.device)
            ctx = model.context(sub, self.cache)
            h = model.hidden_states(tokens.index_select(0, idx), ctx)
            if hidden is None:
                hidden = h.new_empty(len(batch.input_ids), h.shape[-1])
            hidden.index_copy_(0, idx, h)
            verify_ctx = ctx if capture else verify_ctx
        return hidden, verify_ctx, decodes

    def _sample(self, batch: ScheduledBatch, hidden: torch.Tensor, logits: torch.Tensor | None = None,
                argmax: torch.Tensor | None = None) -> StepOutput:
        """Target logits at every sampled row (`logits`, `argmax`: of every row of `hidden` and their argmax, when
        the step's program computed them); the sampled token of plain entries, the accepted run of entries with
        drafts (each position sampled as plain decoding would, assuming the drafts before it accepted)."""
        if len(batch.logits_indices) != hidden.shape[0]:  # some rows are not sampled (a prompt's inner tokens)
            idx = torch.tensor(batch.logits_indices, dtype=torch.long, device=self.device)
            if logits is None:
                hidden = hidden.index_select(0, idx)
            else:
                logits, argmax = logits.index_select(0, idx), argmax.index_select(0, idx)
        if logits is None:
            logits = self.model.lm_head(hidden).float()
        drafts = [batch.entries[i].draft_token_ids for i in batch.sample_indices]
        grammar_seconds = 0.0
        if self.tp is not None and self.tp.rank != 0:  # a worker: rank 0's tokens arrive below
            sampled = SampleOutput(torch.empty(logits.shape[0], dtype=torch.long, device=logits.device), None)
        elif plain_greedy(batch.sampled_seqs):
            sampled = SampleOutput(argmax if argmax is not None else logits.argmax(-1), None)
        else:
            sampling = SamplingBatch.for_sequences(batch.sampled_seqs, logits.device, drafts, logits.shape[-1])
            grammar_seconds = sampling.grammar_seconds
            sampled = sample(logits, sampling)
        if self.tp is not None:
            self.tp.broadcast(sampled.token_ids)
        targets = sampled.token_ids.tolist()
        runs, rows, start = [], [], 0
        for d in drafts:
            run = accepted_run(d, targets[start:start + len(d) + 1])
            runs.append(run)
            rows.append(list(range(start, start + len(run))))
            start += len(d) + 1
        return StepOutput(sampled, runs, rows, [len(d) for d in drafts], [len(r) - 1 for r in runs],
                          grammar_seconds=grammar_seconds)

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """Of each prompt position of `batch.prompt_logprob_spans`, the next prompt token's logprob and rank and the
        top N (`model.token_logprobs`: the LM head a few rows at a time)."""
        spans, dev = batch.prompt_logprob_spans, hidden.device
        rows = torch.tensor(batch.prompt_logprob_rows, dtype=torch.long, device=dev)
        targets = torch.tensor(batch.prompt_logprob_targets, dtype=torch.long, device=dev)
        top_n = min(max(batch.entries[b].seq.params.prompt_logprobs for b, _, _ in spans),
                    self.model.config.vocab_size)
        lp = self.model.token_logprobs(hidden.index_select(0, rows), targets, top_n)
        chosen, ranks = lp.logprobs.tolist(), lp.ranks.tolist()
        top_lp, top_ids = lp.top_logprobs.tolist(), lp.top_ids.tolist()
        out, at, targets = [], 0, batch.prompt_logprob_targets
        for b, first, last in spans:
            n, k = last - first, batch.entries[b].seq.params.prompt_logprobs
            out.append(PromptLogprobs(targets[at:at + n], chosen[at:at + n], ranks[at:at + n],
                                      [t[:k] for t in top_ids[at:at + n]], [t[:k] for t in top_lp[at:at + n]]))
            at += n
        return out

    def _keep_mtp_gaps(self, batch: ScheduledBatch, hidden: torch.Tensor, out: StepOutput) -> None:
        """A decode step of a speculative engine without drafting: keep, per sequence, the MTP head's inputs at
        the positions it kept (its last token and the accepted drafts it verified: main hidden state, next token)."""
        self._drop_finished_gaps()
        hidden = hidden.clone()  # one copy of the step's output per step (the rows below are views of it)
        runs = iter(out.tokens)
        for b, e in enumerate(batch.entries):
            if not e.needs_sample:
                continue
            run = next(runs)  # the accepted drafts and the emitted token: the next tokens of the kept positions
            start = batch.query_start_loc[b]
            self._keep_mtp_gap(e.seq, batch.positions[start], hidden[start:start + len(run)], list(run))

    def _keep_mtp_gap(self, seq, first: int, hidden: torch.Tensor, tokens: list[int]) -> None:
        """Positions first, first + 1, ... of `seq` that the MTP head skipped: their main hidden states [n, D] (not
        changed afterwards) and next tokens, appended to the sequence's gap (a new one where they do not follow
        it)."""
        gap = self._mtp_gaps.get(id(seq))
        if gap is None or gap.end != first:
            gap = self._mtp_gaps[id(seq)] = MTPGap(seq, first)
        gap.add(hidden, tokens)

    def _drop_finished_gaps(self) -> None:
        for key in [k for k, g in self._mtp_gaps.items() if g.seq.is_finished]:
            del self._mtp_gaps[key]

    def _fill_mtp_gaps(self, batch: ScheduledBatch) -> None:
        """Before the MTP head runs over a step: write its K/V at the positions its sequences decoded without it
        (`MTPGap`), in one pass over those positions (keys and values only). A gap that does not end where the
        sequence's step starts (preempted and fed again since) is dropped."""
        self._drop_finished_gaps()
        if not self._mtp_gaps:
            return
        gaps = []
        for b, e in enumerate(batch.entries):
            gap = self._mtp_gaps.pop(id(e.seq), None)
            if gap is not None and gap.end == batch.positions[batch.query_start_loc[b]]:
                gaps.append(gap)
        if not gaps:
            return
        dev = self.model.device
        info = BatchInfo([len(g.tokens) for g in gaps], [g.start for g in gaps], [g.seq.slot for g in gaps],
                         [list(g.seq.block_table) for g in gaps])
        hidden = torch.cat([h for g in gaps for h in g.hidden])
        tokens = torch.tensor([t for g in gaps for t in g.tokens], dtype=torch.long, device=dev)
        # Only the head's K/V there (what its later queries read): no attention, MoE or output.
        self._mtp_write_kv(hidden, tokens, self.model.context(info, self.cache))

    def _mtp(self, batch: ScheduledBatch, info: BatchInfo, ctx: ForwardContext | None, hidden: torch.Tensor,
             out: StepOutput, compiled_verify: bool = False) -> list[list[int]]:
        """The MTP head over this step's positions (main hidden state at t, the token at t + 1: the next fed
        token, the next known prompt token, or the token this step emitted), writing its own K/V there; then, for
        every sampled entry, `num_lookahead` greedy drafts from its last kept position. After a compiled
        verification, the head's forwards of a single sequence are compiled too. First the positions its
        sequences decoded without drafting (`_fill_mtp_gaps`)."""
        model = self.model
        self._fill_mtp_gaps(batch)
        nxt = list(batch.input_ids[1:]) + [0]
        last_kept, runs = [], iter(out.tokens)
        for b, e in enumerate(batch.entries):
            start = batch.query_start_loc[b]
            if e.needs_sample:
                run = next(runs)
                kept = start + e.num_new_tokens - e.num_drafts + len(run) - 2  # flat index of the last kept token
                nxt[kept] = run[-1]
                last_kept.append(kept)
            elif batch.next_token_ids[b] is not None:  # None: a finished prompt that generates nothing
                nxt[start + e.num_new_tokens - 1] = batch.next_token_ids[b]
        if ctx is None:  # the compiled step built its own context
            ctx = model.context(info, self.cache)
        K = batch.num_lookahead
        next_ids = torch.tensor(nxt, dtype=torch.long, device=hidden.device)
        entries = [batch.entries[i] for i in batch.sample_indices]
        drafting = K > 0 and bool(last_kept)
        if fast_decode() and (not drafting or len(nxt) > sum(1 + e.num_drafts for e in entries)):
            # Prompt positions (or no drafts): the head's K/V everywhere, its whole forward (attention, experts,
            # norm) only at the positions that draft (`mtp_prompt_kv_only`).
            self._mtp_write_kv(hidden, next_ids, ctx)
            if not drafting:
                return [[] for _ in last_kept]
            kept = torch.tensor(last_kept, dtype=torch.long, device=hidden.device)
            h = self._mtp_hidden(hidden.index_select(0, kept), next_ids.index_select(0, kept),
                                 self._one_token_context(entries, [batch.positions[k] for k in last_kept],
                                                         compiled_verify), compiled_verify)
        else:  # a verification step (every position a verified one), or the twin: the head's forward over them all
            h = self._mtp_hidden(hidden, next_ids, ctx, compiled_verify)
            if not drafting:
                return [[] for _ in last_kept]
            h = h.index_select(0, torch.tensor(last_kept, dtype=torch.long, device=h.device))
        # Constrained sequences draft inside their grammar, on a copy of their matcher advanced over this step's
        # emitted run and then over each draft (engine.step advances the matcher itself over what is emitted).
        grammars = {}
        for i, e in enumerate(entries):
            if e.seq.grammar is not None:
                g = e.seq.grammar.copy()
                if g.accept(out.tokens[i]):
                    grammars[i] = g
        # Under tensor parallelism only rank 0 holds the matchers: its drafts go to the other ranks, whose MTP K/V
        # must be written from the same tokens.
        sync = self.tp is not None and self.tp.world > 1 and any(e.seq.constrained for e in entries)
        return self._draft(batch, h, entries, last_kept, K, compiled_verify, grammars, sync)

    def _draft(self, batch: ScheduledBatch, h: torch.Tensor, entries: list, last_kept: list[int], K: int,
               compiled_verify: bool, grammars: dict, sync: bool = False) -> list[list[int]]:
        """Greedy drafts of the MTP head from its hidden states `h` at each sampled entry's last kept position; a
        constrained entry's draft is the argmax among the tokens its grammar (a copy in `grammars`, advanced over
        the drafts) allows there. `sync`: every draft is rank 0's, broadcast."""
        draft = self._draft_argmax(self.draft_head(h), list(range(len(entries))), grammars, sync)
        drafts = [[t] for t in draft.tolist()]
        # Recursive drafting: the head's own hidden state and its last draft, one position further each time, as
        # long as the sequence's blocks hold the position (the scheduler allocates them ahead when it can; once a
        # position is past them, so are the later ones).
        pos = [batch.positions[k] for k in last_kept]
        bs = self.cache.block_size
        for j in range(1, K):
            live = [i for i, e in enumerate(entries) if pos[i] + j < len(e.seq.block_table) * bs]
            if not live:
                break
            sel = torch.tensor(live, dtype=torch.long, device=h.device)
            full = len(live) == len(entries)
            h_live = self._mtp_hidden(h if full else h[sel], draft if full else draft[sel],
                                      self._one_token_context([entries[i] for i in live],
                                                              [pos[i] + j for i in live], compiled_verify),
                                      compiled_verify)
            d_live = self._draft_argmax(self.draft_head(h_live), live, grammars, sync)
            if full:
                h, draft = h_live, d_live
            else:
                h, draft = h.index_copy(0, sel, h_live), draft.index_copy(0, sel, d_live)
            for i, t in zip(live, d_live.tolist()):
                drafts[i].append(t)
        return drafts

    def _one_token_context(self, entries: list, positions: list[int], compiled: bool) -> ForwardContext:
        """The context of one MTP query per entry, at `positions` (over the head's K/V up to there), in the form the
        compiled head takes after a compiled verification (`compiled`: index-based access, no views)."""
        step = BatchInfo([1] * len(entries), positions, [e.seq.slot for e in entries],
                         [list(e.seq.block_table) for e in entries])
        return self.model.context(step, self.cache, views=not compiled)

    def _draft_argmax(self, logits: torch.Tensor, rows_of: list[int], grammars: dict,
                      sync: bool = False) -> torch.Tensor:
        """argmax per row of `logits` (row r drafts for entry rows_of[r]); constrained entries take the argmax
        among the tokens their grammar allows (only end-of-sequence tokens once it is complete) and advance their
        matcher copy over it. `sync` (tensor parallelism with constrained entries): rank 0's drafts on every rank."""
        if sync:
            if self.tp.rank == 0:
                draft = self._draft_argmax(logits, rows_of, grammars).contiguous()
            else:
                draft = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
            return self.tp.broadcast(draft)
        constrained = [r for r, i in enumerate(rows_of) if i in grammars]
        if not constrained:
            return logits.argmax(-1)
        t0 = time.perf_counter()
        V = logits.shape[-1]
        bitmask = torch.full((len(constrained), words_per_row(V)), -1, dtype=torch.int32)
        for k, r in enumerate(constrained):
            grammars[rows_of[r]].fill_masks(bitmask, k, ())
        rows = torch.tensor(constrained, dtype=torch.long, device=logits.device)
        allowed = allowed_mask(bitmask, V).to(logits.device)
        logits = logits.index_copy(0, rows, logits.index_select(0, rows).masked_fill(~allowed, float("-inf")))
        draft = logits.argmax(-1)
        for r, t in zip(constrained, draft[rows].tolist()):
            g = grammars[rows_of[r]]
            if not g.accept([t]):
                del grammars[rows_of[r]]
        self.draft_grammar_seconds += time.perf_counter() - t0
        return draft

    def _mtp_hidden(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: ForwardContext,
                    compiled: bool) -> torch.Tensor:
        """The drafting MTP layer's hidden states [N, D] from main hidden states [N, D] at t and tokens t + 1 [N]
        (`model.mtp_hidden` with `draft_mtp`), writing its K/V at these positions."""
        if compiled and self.compiled.handles_mtp(ctx):
            return self.compiled.mtp_hidden(hidden, next_tokens, ctx)
        return self.draft_mtp(hidden, self.model.model.embed_tokens(next_tokens), ctx)

    def _mtp_write_kv(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: ForwardContext) -> None:
        """What `_mtp_hidden` leaves in the cache, alone: the drafting MTP layer's K/V at these positions."""
        self.draft_mtp.write_kv(hidden, self.model.model.embed_tokens(next_tokens), ctx)

