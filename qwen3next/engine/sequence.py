"""One generation stream: its tokens, where it stands in the cache, and its lifecycle. Plain Python, no torch."""

from __future__ import annotations

import enum

from .sampling import SamplingParams

_MASK64 = (1 << 64) - 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # never run yet
    RUNNING = "running"  # holds a state slot and KV blocks
    PREEMPTED = "preempted"  # lost its cache; waits to recompute prompt + output as one prompt
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos / stop token / stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


class Sequence:
    """Token history and cache bookkeeping of one sequence.

    The tokens are `prompt_token_ids + output_token_ids`. The first `num_computed_tokens` of them are in the
    cache (KV written to `block_table`, DeltaNet state folded into `slot`). Feeding the remaining ones (all at
    once, or in prefill chunks) makes the logits of the last fed token the distribution of the next token.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                 sample_index: int = 0):
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        if sample_index < 0:
            raise ValueError(f"sample_index must be >= 0, got {sample_index}")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params if params is not None else SamplingParams()
        self.sample_index = sample_index  # which of the request's n samples this is
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.slot: int | None = None
        # Prefix caching: the digests of its full blocks (prefix_cache.block_digest; tokens never change, so they stay
        # valid across preemptions), how many of its blocks are indexed, and the prompt tokens its first admission
        # found cached (OpenAI's usage.prompt_tokens_details.cached_tokens).
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0
        self.draft_token_ids: list[int] = []  # proposed by the MTP head for the next step (speculative decoding)
        # engine/structured.GrammarMatcher of a constrained request (params.structured_outputs): it has consumed
        # exactly output_token_ids; the sampler masks what it does not allow.
        self.grammar = None
        self.arrival = -1  # order of add() in the scheduler
        self.num_preemptions = 0
        # Prompt logprobs: positions [0, this) already have their next prompt token's logprob (the results live
        # in the engine's output stage; a recompute after preemption must not produce them again).
        self.num_prompt_logprobs = 0
        # Base of the per-token seeds; the n samples of one request must not draw the same numbers.
        self.base_seed = None if self.params.seed is None else _mix64(_mix64(self.params.seed) ^ sample_index)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, slot={self.slot}, "
                f"blocks={len(self.block_table)})")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The request asked for prompt logprobs and this is its first sample (the n samples share one prompt)."""
        return self.params.prompt_logprobs is not None and self.sample_index == 0

    @property
    def constrained(self) -> bool:
        """Its tokens follow a grammar (the runner's tensor-parallel ranks, which hold no matcher, read this)."""
        return self.grammar is not None

    @property
    def samples_argmax(self) -> bool:
        """Its next token is the argmax of the raw logits: greedy, no penalties, no grammar, no logprobs (the sampler
        would do exactly that). Such sequences can decode several steps in a row without the scheduler between them
        (`SchedulerConfig.num_scheduler_steps`)."""
        p = self.params
        return p.is_greedy and not p.has_penalties and p.logprobs is None and self.grammar is None

    @property
    def is_prefilling(self) -> bool:
        """More than the last token is missing from the cache (fresh prompt, or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    def token_ids_between(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    def sampling_seed(self, ahead: int = 0) -> int | None:
        """Seed for the generator that draws the next token (or, with `ahead`, the token that many positions after
        it: speculative verification samples several positions at once); None when the request is unseeded.

        It depends only on (params.seed, sample_index, number of tokens generated before it), so a seeded
        sequence samples the same tokens whatever it is batched with, after preemption, and with or without
        speculative decoding.
        """
        if self.base_seed is None:
            return None
        # Keep it in [0, 2**63) so torch.Generator.manual_seed accepts it on every backend.
        return _mix64(self.base_seed + self.num_output_tokens + ahead) >> 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap bijective scramble of 64-bit ints."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
