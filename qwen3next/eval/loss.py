"""Per-token loss of long texts, and its bucketing by position.

`token_nll` runs one sequence through a fresh cache a chunk of tokens per forward and keeps only that chunk's hidden
states; the LM head then runs on a few rows at a time. Memory is the cache (K/V of the attention layers, the fixed
DeltaNet state) plus one chunk, never [T, vocab] logits, so a 64K-token window of a 150K-vocab model fits where one
full forward would need tens of GB. `token_nll_full` is its plain twin (one forward, all logits) for short inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model.qwen3_next import Qwen3NextForCausalLM


def _as_ids(ids: list[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"ids: need at least 2 tokens to score one, got {ids.numel()}")
    return ids


@torch.no_grad()
def token_nll(model: Qwen3NextForCausalLM, ids: list[int] | torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Negative log-likelihood [T - 1] (fp32, nats) of tokens 1..T-1 of one sequence ids [T], each given every token
    before it, computed `chunk_size` tokens per cached forward. Entry i scores the token at position i + 1."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    ids = _as_ids(ids)
    T = ids.numel()
    device = model.device
    targets = ids[1:].to(device)
    nll = torch.empty(T - 1, dtype=torch.float32)
    cache = model.new_cache(1, T - 1)  # the last token predicts nothing: it is never forwarded
    for start in range(0, T - 1, chunk_size):
        n = min(chunk_size, T - 1 - start)
        ctx = model.context(cache.batch([0], [n]), cache.hybrid)
        hidden = model.hidden_states(ids[start:start + n].to(device), ctx)  # [n, D]
        cache.advance([0], [n])
        nll[start:start + n] = -model.token_logprobs(hidden, targets[start:start + n]).logprobs.cpu()
    return nll


@torch.no_grad()
def token_nll_full(model: Qwen3NextForCausalLM, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """The plain twin of `token_nll`: one forward without a cache, all [T, vocab] logits at once (short inputs)."""
    ids = _as_ids(ids).to(model.device)
    logits = model(ids[None])[0, :-1].float()  # [T - 1, vocab]
    return F.cross_entropy(logits, ids[1:], reduction="none").cpu()


def perplexity(nll: float) -> float:
    """exp(mean NLL); inf where that overflows a float (a loss above ~709 nats), nan for nan (nothing scored)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def split_windows(ids: list[int], context: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `context` tokens from the start of `ids` (a shorter tail is dropped), at most
    `max_windows` of them."""
    if context < 2:
        raise ValueError(f"context: expected >= 2 tokens, got {context}")
    n = len(ids) // context
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * context:(i + 1) * context] for i in range(n)]


def default_bucket_size(context: int) -> int:
    """4096 tokens, or context / 8 when that is smaller (so a short context still gets several buckets)."""
    return max(1, min(4096, context // 8))


@dataclass
class PositionLoss:
    """Summed loss and scored-token count per position bucket, over windows of `context` tokens.

    Bucket b holds positions [b * bucket_size, (b + 1) * bucket_size) of a window; position 0 is never scored (it
    has no context), so bucket 0 holds one token less than the others per window, and the last bucket may be short.
    """

    context: int
    bucket_size: int
    sums: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    windows: int = 0

    def __post_init__(self) -> None:
        if self.bucket_size < 1 or self.context < 2:
            raise ValueError(f"bucket_size / context: expected >= 1 / >= 2, got {self.bucket_size} / {self.context}")
        n = math.ceil(self.context / self.bucket_size)
        self.sums = self.sums or [0.0] * n
        self.counts = self.counts or [0] * n

    def add(self, nll: torch.Tensor) -> None:
        """Add one window's `token_nll` [context - 1] (entry i scores position i + 1)."""
        if nll.shape != (self.context - 1,):
            raise ValueError(f"nll: expected shape ({self.context - 1},) for a window of {self.context} tokens, "
                             f"got {tuple(nll.shape)}")
        bucket = torch.arange(1, self.context) // self.bucket_size
        n = len(self.sums)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, bucket, nll.double())
        counts = torch.bincount(bucket, minlength=n)
        self.sums = [a + b for a, b in zip(self.sums, sums.tolist())]
        self.counts = [a + b for a, b in zip(self.counts, counts.tolist())]
        self.windows += 1

    @property
    def mean_nll(self) -> float:
        return sum(self.sums) / sum(self.counts) if sum(self.counts) else math.nan

    def buckets(self) -> list[dict]:
        """Per bucket: its positions [start, end), tokens scored, mean NLL and perplexity."""
        out = []
        for b, (s, n) in enumerate(zip(self.sums, self.counts)):
            start, end = b * self.bucket_size, min((b + 1) * self.bucket_size, self.context)
            nll = s / n if n else math.nan
            out.append({"start": start, "end": end, "tokens": n, "nll": nll, "ppl": perplexity(nll)})
        return out

    def to_dict(self) -> dict:
        mean = self.mean_nll
        return {"context": self.context, "windows": self.windows, "bucket_size": self.bucket_size,
                "tokens": sum(self.counts), "nll": mean, "ppl": perplexity(mean),
                "buckets": self.buckets()}
