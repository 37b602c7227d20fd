"""Batched token sampling: penalties, temperature, top-k / top-p / min-p, per-row seeded draws, logprobs.

Order of operations per row: allowed-token mask (grammars) -> repetition penalty (HF), presence/frequency penalties
(OpenAI) -> greedy rows take the argmax here -> temperature -> top-k -> top-p -> min-p -> one draw. The draw is an
exponential race, argmax(p / E) with E ~ Exp(1) i.i.d., which samples exactly from p; a row with a generator draws
its E from that generator alone, so its token does not depend on the other rows of the batch.

Returned logprobs are those of the raw model distribution (log_softmax of the logits as given, before the mask,
penalties, temperature and truncation), like vLLM's default ("raw logprobs"): a token a grammar forced can carry a
low logprob, which shows how far the constraint pulled the model. The runner builds one `SamplingBatch` per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass

import torch

from .sampling import SamplingParams
from .sequence import Sequence
from .structured import allowed_mask, words_per_row


@dataclass
class SampleOutput:
    """token_ids [B] int64; logprobs [B] float32 of the chosen tokens (None when no row asked for logprobs);
    top_token_ids / top_logprobs [B, N]
    with N = the largest `logprobs` asked for in the batch (None when no row asked; rows asking for fewer
    use a prefix)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_token_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


@dataclass
class SamplingBatch:
    """Everything one step samples with, one entry per logits row.

    generators: one per row (None = the default generator); one seeded per sequence makes draws reproducible.
    prompt_token_ids / output_token_ids: per row, needed only when some row has a penalty.
    allowed: optional bool mask, True where a token may be picked (a grammar's mask): [B, V], or, with
    `allowed_rows` [R] (the rows it constrains), [R, V] for those rows only.
    """

    params: SequenceLike[SamplingParams]
    generators: SequenceLike[torch.Generator | None] | None = None
    prompt_token_ids: SequenceLike[SequenceLike[int]] | None = None
    output_token_ids: SequenceLike[SequenceLike[int]] | None = None
    allowed: torch.Tensor | None = None
    allowed_rows: torch.Tensor | None = None
    grammar_seconds: float = 0.0  # spent building the grammars' masks

    @classmethod
    def for_sequences(cls, seqs: SequenceLike[Sequence], device: torch.device | str,
                      drafts: SequenceLike[SequenceLike[int]] | None = None,
                      vocab_size: int | None = None) -> SamplingBatch:
        """The batch of these sequences' next tokens: their params, a generator per seeded sequence (seeded by the
        sequence's own token count, so a draw does not depend on the rest of the batch) and, when some sequence
        has a penalty, the token histories.

        With `drafts` (a speculative verification), sequence i owns 1 + len(drafts[i]) consecutive rows, row j
        sampling the token j positions ahead exactly as plain decoding would once drafts[i][:j] were emitted (its
        seed for that position; its output history extended by those drafts for the penalties; its grammar's mask
        after those drafts). Grammar masks need `vocab_size` (the logits' width)."""
        drafts = drafts if drafts is not None else [()] * len(seqs)
        allowed = allowed_rows = None
        grammar_seconds = 0.0
        if vocab_size and any(s.grammar is not None for s in seqs):
            t0 = time.perf_counter()
            allowed_rows, allowed = grammar_masks(seqs, drafts, vocab_size)
            allowed_rows, allowed = allowed_rows.to(device), allowed.to(device)
            grammar_seconds = time.perf_counter() - t0
        params, generators, prompts, outputs = [], [], [], []
        for s, d in zip(seqs, drafts):
            for j in range(len(d) + 1):
                seed = s.sampling_seed(j)
                generators.append(None if seed is None else torch.Generator(device=device).manual_seed(seed))
                params.append(s.params)
                prompts.append(s.prompt_token_ids)
                outputs.append(s.output_token_ids + list(d[:j]) if j else s.output_token_ids)
        if not any(p.has_penalties for p in params):
            return cls(params, generators, allowed=allowed, allowed_rows=allowed_rows, grammar_seconds=grammar_seconds)
        return cls(params, generators, prompts, outputs, allowed, allowed_rows, grammar_seconds)


def grammar_masks(seqs: SequenceLike[Sequence], drafts: SequenceLike[SequenceLike[int]],
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a batch that constrained sequences sample at ([R] long: each such sequence's 1 + len(drafts)
    rows) and their grammars' allowed tokens there ([R, vocab_size] bool, per verified position)."""
    rows, row = [], 0
    for s, d in zip(seqs, drafts):
        if s.grammar is not None:
            rows.extend(range(row, row + len(d) + 1))
        row += len(d) + 1
    bitmask = torch.full((len(rows), words_per_row(vocab_size)), -1, dtype=torch.int32)
    at = 0
    for s, d in zip(seqs, drafts):
        if s.grammar is not None:
            s.grammar.fill_masks(bitmask, at, d)
            at += len(d) + 1
    return torch.tensor(rows, dtype=torch.long), allowed_mask(bitmask, vocab_size)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
    """Pick one token per row of `logits` [B, V]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B, V = logits.shape
    params, generators = batch.params, batch.generators
    prompt_token_ids, output_token_ids = batch.prompt_token_ids, batch.output_token_ids
    if len(params) != B:
        raise ValueError(f"got {len(params)} SamplingParams for {B} logits rows")
    if generators is not None and len(generators) != B:
        raise ValueError(f"got {len(generators)} generators for {B} logits rows")
    logits = batch_logits = logits.float()
    if batch.allowed is not None:
        logits = apply_allowed(logits, batch.allowed, batch.allowed_rows)

    if any(p.has_penalties for p in params):
        if output_token_ids is None or len(output_token_ids) != B:
            raise ValueError("output_token_ids (one list per row) is required when a row has a penalty")
        if any(p.repetition_penalty != 1.0 for p in params) and (prompt_token_ids is None or
                                                                 len(prompt_token_ids) != B):
            raise ValueError("prompt_token_ids (one list per row) is required when a row has a repetition_penalty")
        logits = apply_penalties(logits, params, prompt_token_ids, output_token_ids)

    token_ids = torch.empty(B, dtype=torch.long, device=logits.device)
    greedy = [p.is_greedy for p in params]
    if any(greedy):
        token_ids[:] = logits.argmax(dim=-1)
    if not all(greedy):
        random_rows = [i for i, g in enumerate(greedy) if not g]
        rows = torch.tensor(random_rows, device=logits.device)
        sub_params = [params[i] for i in random_rows]
        probs = truncated_probs(logits[rows], sub_params)
        sub_gens = None if generators is None else [generators[i] for i in random_rows]
        token_ids[rows] = draw(probs, sub_gens)

    if all(p.logprobs is None for p in params):  # nobody reads them: skip the log_softmax over the vocabulary
        return SampleOutput(token_ids, None)
    raw_logprobs = torch.log_softmax(batch_logits, dim=-1)  # [B, V]
    chosen = raw_logprobs.gather(1, token_ids[:, None])[:, 0]
    num_top = min(V, max((p.logprobs or 0) for p in params))
    if num_top == 0:
        return SampleOutput(token_ids, chosen)
    top_logprobs, top_ids = raw_logprobs.topk(num_top, dim=-1)
    return SampleOutput(token_ids, chosen, top_ids, top_logprobs)


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """-inf where `allowed` is False: [B, V] for every row, or [R, V] for `rows` [R] only (a grammar's rows, which
    always allow an end-of-sequence token: not checked, no device sync). A row that allows no token is an error
    (nothing could be sampled)."""
    if rows is not None:
        if allowed.shape != (rows.shape[0], logits.shape[1]) or allowed.dtype != torch.bool:
            raise ValueError(f"allowed: expected a bool mask of shape {(rows.shape[0], logits.shape[1])}, got "
                             f"{allowed.dtype} {tuple(allowed.shape)}")
        return logits.index_put((rows,), logits.index_select(0, rows).masked_fill(~allowed, float("-inf")))
    if allowed.shape != logits.shape or allowed.dtype != torch.bool:
        raise ValueError(f"allowed: expected a bool mask of shape {tuple(logits.shape)}, got "
                         f"{allowed.dtype} {tuple(allowed.shape)}")
    empty = (~allowed.any(dim=-1)).nonzero()
    if empty.numel():
        raise ValueError(f"allowed: row {int(empty[0, 0])} allows no token")
    return logits.masked_fill(~allowed, float("-inf"))


def apply_penalties(
    logits: torch.Tensor,
    params: SequenceLike[SamplingParams],
    prompt_token_ids: SequenceLike[SequenceLike[int]] | None,
    output_token_ids: SequenceLike[SequenceLike[int]],
) -> torch.Tensor:
    """Repetition (HF: seen in prompt or output), presence and frequency (OpenAI: counts in output) penalties.

    logits [B, V] float32 -> new [B, V] tensor.
    """
    B, V = logits.shape
    dev = logits.device
    out_counts = _token_counts(output_token_ids, B, V, dev)  # [B, V]
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    if (rep != 1.0).any():
        assert prompt_token_ids is not None
        seen = (_token_counts(prompt_token_ids, B, V, dev) + out_counts) > 0
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def _token_counts(token_ids: SequenceLike[SequenceLike[int]], B: int, V: int, device: torch.device) -> torch.Tensor:
    """Per-row occurrence counts [B, V] float32 of lists of token ids."""
    width = max((len(t) for t in token_ids), default=0)
    counts = torch.zeros(B, V + 1, device=device)
    if width == 0:
        return counts[:, :V]
    # Pad with the extra column V, dropped below.
    idx = torch.full((B, width), V, dtype=torch.long)
    for i, t in enumerate(token_ids):
        if len(t):
            idx[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    idx = idx.to(device)
    counts.scatter_add_(1, idx, torch.ones(idx.shape, device=device))
    return counts[:, :V]


def truncated_probs(logits: torch.Tensor, params: SequenceLike[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking; logits [B, V] -> probabilities [B, V] (masked = 0).

    All rows must be non-greedy. Top-k keeps exactly k tokens (ties at the boundary broken by sort order); top-p
    keeps the smallest prefix of the sorted distribution whose mass reaches top_p (at least one token); min-p
    drops tokens whose probability is below min_p times the largest one.
    """
    V = logits.shape[1]
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    logits = logits / temps
    use_top_k = any(p.has_top_k for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(V, device=dev)[None, :]
        if use_top_k:
            k = torch.tensor([p.top_k if p.has_top_k else V for p in params], device=dev)[:, None]
            sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        if use_top_p:
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # Rows without top-p get a threshold the rounded cumsum can never reach.
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=dev)[:, None]
            # A token is dropped once the tokens ranked above it already reach top_p; rank 0 always stays.
            sorted_logits = sorted_logits.masked_fill((mass_before >= top_p) & (rank > 0), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generators: SequenceLike[torch.Generator | None] | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] by exponential race; row i uses generators[i] when given. -> [B] int64."""
    B, _ = probs.shape
    noise = torch.empty_like(probs)
    shared = [i for i in range(B) if generators is None or generators[i] is None]
    if len(shared) == B:
        noise.exponential_()
    else:
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        if shared:
            rows = torch.tensor(shared, device=probs.device)
            noise[rows] = torch.empty_like(noise[rows]).exponential_()
    # E can be exactly 0 in float32; a floor keeps masked tokens at 0 / tiny = 0 instead of NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
