"""Speculative decoding with the model's own MTP head: the configuration, the acceptance rule and the adaptive draft
length. Plain Python, no torch (the tensor work is in runner.py).

One engine step of a decoding sequence with drafts d_1..d_k (proposed by the MTP head at the previous step):
1. the main model runs over [x, d_1, ..., d_k] (x = the last emitted token) in ONE forward, keeping every DeltaNet
   state (model/batch.py `capture_states`);
2. the target token at each of the k + 1 positions is SAMPLED exactly as plain decoding would sample it there
   (same penalties, temperature, top-k/p, min-p, and for seeded requests the same per-token random stream), with
   the drafts before it assumed accepted;
3. `accepted_run`: the longest prefix of drafts equal to those samples is accepted, and the sample at the first
   mismatch (or after the last draft) is emitted too: 1..k+1 tokens per step;
4. the state after the last kept token is committed; K/V of the rejected positions are overwritten later;
5. the MTP head runs over the same positions (main hidden state at t, the token emitted at t + 1) and drafts the
   next k tokens greedily (recursively, from its own hidden state).

Why this is exact: the token emitted at every position is the target's own sample given the emitted prefix, so the
output is distributed exactly as plain decoding (for greedy and seeded requests it is the very same tokens). It is
speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023) with a deterministic draft: the draft d is
accepted with probability p(d), and on rejection the token comes from p without d, renormalised (the residual
max(0, p - q) of a one-hot q).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass

METHODS = ("mtp", "qwen3_next_mtp")  # ours, and vLLM's name for the same thing
MAX_SPECULATIVE_TOKENS = 4
DRAFT_HEADS = (None, "int8", "target")


@dataclass(frozen=True)
class SpeculativeConfig:
    """`{"method": "mtp", "num_speculative_tokens": k}` (vLLM's keys), plus `"adaptive"` (default true): let the
    engine pick the draft length per step (0..k) from measured step times and acceptance; and `"draft_head"`: the
    weights the drafts come from, "int8" (int8 copies of `lm_head` and of the MTP layer's projections and experts,
    drafting only) or "target" (the model's own). Default: "int8" for a float `lm_head` on a CPU with the native
    kernels, else "target". The drafts only propose tokens, so the output stays exactly the target's either way;
    what changes is the cost of drafting (one `lm_head` per draft, the largest matrix of a step, and the MTP layer
    per draft: 4x fewer bytes) and, slightly, which drafts are proposed. `"speculative_token_map"` (SGLang's name):
    a file of token ids (`qwen3next token-map` writes one) to which the drafts are restricted: their logits come
    from those rows of the head only (engine/draft_vocab.py); exact all the same."""

    method: str = "mtp"
    num_speculative_tokens: int = 2
    adaptive: bool = True
    draft_head: str | None = None
    speculative_token_map: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an int in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config: adaptive must be true or false, got {self.adaptive!r}")
        if self.draft_head not in DRAFT_HEADS:
            raise ValueError(f"speculative_config: draft_head must be one of {', '.join(map(repr, DRAFT_HEADS[1:]))} "
                             f"or null (automatic), got {self.draft_head!r}")
        if self.speculative_token_map is not None and (not isinstance(self.speculative_token_map, str)
                                                       or not self.speculative_token_map):
            raise ValueError(f"speculative_config: speculative_token_map must be the path of a token map file, got "
                             f"{self.speculative_token_map!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From a dict, a JSON object string (the CLI's `--speculative-config`) or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e.msg} at character {e.pos}): "
                                 f"{value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object such as "
                             f'{{"method": "mtp", "num_speculative_tokens": 2}}, got {value!r}')
        known = ("method", "num_speculative_tokens", "adaptive", "draft_head", "speculative_token_map")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r} (known: {', '.join(known)})")
        if "method" not in value:
            raise ValueError('speculative_config: "method" is required ("mtp")')
        return cls(**value)


def accepted_run(drafts: SequenceLike[int], targets: SequenceLike[int]) -> list[int]:
    """The tokens a verification step emits: drafts while each equals the target sampled at its position, then the
    target at the first mismatch (or after the last draft). `targets` has len(drafts) + 1 entries."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"targets: expected {len(drafts) + 1} (one per draft, plus one), got {len(targets)}")
    out = []
    for d, t in zip(drafts, targets):
        out.append(t)
        if d != t:
            return out
    out.append(targets[-1])
    return out


def _bucket(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share their timing statistics."""
    b = 1
    while b < batch_size:
        b *= 2
    return b


class DraftLengthPolicy:
    """How many tokens to draft per sequence at the next step, chosen to maximise emitted tokens per second.

    Per draft position j it keeps the acceptance rate a_j = P(draft j accepted | drafts before it accepted) over its
    last `4 * window` chances. Expected tokens per sequence per step with k drafts: 1 + a_1 + a_1 a_2 + ... (k
    terms). Per batch-size bucket (1, 2, 3-4, 5-8, ...) and draft length k it keeps the last `window` step times,
    and picks the k with the best tokens / median step time. Lengths not yet timed in a bucket are tried first
    (longest first), then drafting goes on until `window` verifications measured the acceptance; the current
    choice is kept unless another is more than `margin` faster (no flapping on noise; 3x that to turn drafting on
    or off, which costs a step more). A busy machine makes step times drift, so
    the neighbouring lengths (best - 1, best + 1) and no drafting (0) are timed again, one at a time: every
    `explore_every` steps while the best is within 10% of the runner-up, 4x less often while it leads by less than
    50%, 16x less often beyond (exploring costs: a step at a worse length, two for a longer one, which has no
    drafts to verify at its first step, and after a step without drafts, one more whose drafts are still missing),
    and never more often than keeps its expected cost under `explore_budget` of the decode time (the tokens the
    explored length's steps lose against the best's rate, plus, for a longer one, its first step's extra time taken
    as the verification's; measured on the demo model, compiled, batch 8: a verification of 2 drafts there runs
    eagerly at ~6x a step, and exploring it every ~128 steps cost ~6% of the decode time).
    Only samples from the last `horizon` steps count while there are `min_samples` of them. With `adaptive=False`
    it always returns `max_k`. `lengths`: the draft lengths it may pick (default 0..max_k; "neighbours" are then the
    adjacent ones in that list). The engine with a compiled decoder passes (0, max_k): only a verification of
    max_k drafts has a compiled program, a shorter one runs eagerly at several times the cost of a step (measured on
    the demo model: 16-20 ms against 2-6 ms), and timing it every so often cost ~10% of the decode time.
    """

    def __init__(self, max_k: int, adaptive: bool = True, window: int = 16, explore_every: int = 32,
                 min_samples: int = 3, margin: float = 0.05, lengths: tuple[int, ...] | None = None,
                 explore_budget: float = 0.02):
        self.lengths = sorted(set(range(max_k + 1) if lengths is None else lengths))
        if max_k not in self.lengths or not all(isinstance(k, int) and 0 <= k <= max_k for k in self.lengths):
            raise ValueError(f"lengths: expected draft lengths in 0..{max_k} including {max_k}, got {lengths!r}")
        self.max_k, self.adaptive = max_k, adaptive
        self.window, self.explore_every, self.min_samples, self.margin = window, explore_every, min_samples, margin
        self.explore_budget = explore_budget
        self.horizon = 16 * explore_every * max(1, max_k) * min_samples  # the sparsest exploration still counts
        self._chances = [deque(maxlen=4 * window) for _ in range(max_k)]  # per position: 1 accepted / 0 rejected
        self._times: dict[tuple[int, int], deque[tuple[int, float]]] = {}  # (bucket, k) -> (step, seconds)
        self._steps: dict[int, int] = {}
        self._best: dict[int, int] = {}
        self._explored: dict[int, int] = {}
        self._episode: dict[int, tuple[int, int]] = {}  # bucket -> (length being explored, steps left)
        self.last_choice = max_k

    def acceptance(self) -> list[float]:
        """a_j per draft position j = 1..max_k (optimistic 1.0 before any measurement)."""
        return [sum(c) / len(c) if c else 1.0 for c in self._chances]

    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for a in self.acceptance()[:k]:
            run *= a
            total += run
        return total

    def choose(self, batch_size: int) -> int:
        """Draft length for a decode step of `batch_size` sequences."""
        self.last_choice = self._choose(batch_size)
        return self.last_choice

    def _choose(self, batch_size: int) -> int:
        if not self.adaptive:
            return self.max_k
        bucket = _bucket(batch_size)
        for k in reversed(self.lengths):  # untimed lengths first
            if len(self._times.get((bucket, k), ())) < self.min_samples:
                return k
        if len(self._chances[0]) < self.window and 0 in self.lengths:
            # Too few verifications to know the acceptance yet (a few first drafts of a text are a poor guide: on
            # the demo model 3 gave 50% where the next 80 gave 95%): keep drafting until `window` of them.
            return self.max_k
        k, left = self._episode.get(bucket, (0, 0))
        if left:  # an exploration in progress
            self._episode[bucket] = (k, left - 1)
            return k
        best, lead, rate, secs = self._rank(bucket)
        step = self._steps.get(bucket, 0)
        every = self.explore_every * (1 if lead < 1.1 else 4 if lead < 1.5 else 16)
        i = self.lengths.index(best)
        neighbours = set(self.lengths[max(0, i - 1):i + 2]) | ({0} & set(self.lengths))
        others = sorted(neighbours - {best})
        if not others:
            return best
        n = self._explored.get(bucket, 0)
        k = others[n % len(others)]  # the length to time next
        every = max(every, self._cost_period(rate, secs, k, best))
        if step % every == every - 1:  # time another length now and then
            self._explored[bucket] = n + 1
            # a longer length than the drafts at hand is timed only at its second step (the first drafts it)
            self._episode[bucket] = (k, 1 if k > best else 0)
            return k
        return best

    def _rank(self, bucket: int) -> tuple[int, float, dict[int, float], dict[int, float]]:
        """The best length, how much faster it is than the runner-up (a ratio >= 1), and per length the rate (tokens
        per second) and the step time it was ranked by."""
        now = self._steps.get(bucket, 0)

        def seconds(k: int) -> float:
            samples = self._times[(bucket, k)]
            recent = [t for step, t in samples if step >= now - self.horizon]
            return statistics.median(recent if len(recent) >= self.min_samples else [t for _, t in samples])

        secs = {k: seconds(k) for k in self.lengths}
        rate = {k: self.expected_tokens(k) / max(secs[k], 1e-12) for k in self.lengths}
        best = max(rate, key=rate.get)
        current = self._best.get(bucket)
        # Turning drafting on or off costs a step more (the MTP head's drafts are missing, or wasted): a larger
        # margin for that switch.
        margin = self.margin if current is None or (current == 0) == (best == 0) else 3 * self.margin
        if current is not None and rate[current] * (1 + margin) >= rate[best]:
            best = current
        self._best[bucket] = best
        rest = [r for k, r in rate.items() if k != best]
        return best, rate[best] / max(max(rest), 1e-12) if rest else float("inf"), rate, secs

    def _cost_period(self, rate: dict[int, float], secs: dict[int, float], k: int, best: int) -> int:
        """The fewest steps between explorations of length `k` that keep their expected cost (seconds lost against
        the best length's rate) under `explore_budget` of the time the best length's steps take."""
        lost = secs[k] * max(0.0, 1 - rate[k] / max(rate[best], 1e-12))
        if k > best:  # its first step drafts without verifying: about as much extra time as a verification
            lost += max(0.0, secs[k] - secs[best])
        return max(1, math.ceil(lost / max(self.explore_budget * secs[best], 1e-12)))

    def record_step(self, batch_size: int, k: int, seconds: float) -> None:
        """The wall time of a decode step of `batch_size` sequences that drafted `k` tokens per sequence."""
        bucket = _bucket(batch_size)
        step = self._steps.get(bucket, 0)
        self._times.setdefault((bucket, k), deque(maxlen=self.window)).append((step, seconds))
        self._steps[bucket] = step + 1

    def record_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's verification: `num_accepted` of its `num_drafts` drafts were accepted."""
        for j in range(min(num_drafts, num_accepted + 1)):
            self._chances[j].append(1 if j < num_accepted else 0)


@dataclass
class SpecStats:
    """Counters of the engine's speculative decoding (for /metrics, the bench and RequestOutput)."""

    num_drafts: int = 0  # verification chances: sequences x steps that had at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens emitted by those verifications (accepted + 1 each)

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * MAX_SPECULATIVE_TOKENS
        self.drafted_per_position = [0] * MAX_SPECULATIVE_TOKENS

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_accepted + 1
        for j in range(num_drafts):
            self.drafted_per_position[j] += 1
            self.accepted_per_position[j] += j < num_accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification (1 + accepted drafts); 0 before any."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_by_position(self) -> list[float | None]:
        return [a / d if d else None for a, d in zip(self.accepted_per_position, self.drafted_per_position)]
