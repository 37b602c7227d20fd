"""Per-request sampling parameters (OpenAI / vLLM names and semantics). Plain Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# Temperatures below this sample greedily (as in vLLM): logits / T would overflow float32 into inf/NaN, and such a
# temperature stands for the argmax anyway.
GREEDY_TEMPERATURE_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy (argmax). `top_k` -1 or 0 turns top-k off. Repetition penalty follows HF
    (seen prompt+output tokens: positive logits divided, negative multiplied); presence/frequency penalties
    follow OpenAI (output tokens only). `stop` strings are matched by the detokenizing caller; `stop` is
    normalised to a list. `logprobs` N asks for the N most likely alternatives per token (raw model logprobs).
    `prompt_logprobs` N (vLLM's name) asks for the logprob of every prompt token given the tokens before it, with
    its rank and the N most likely alternatives (0: the prompt token alone); computed in the prefill chunks.
    `max_tokens` 0 prefills the prompt and generates nothing (finish reason "length"): prompt logprobs only; it
    needs `n` 1.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        _check_float("temperature", self.temperature, low=0.0, expected=">= 0 (0 = greedy)")
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True, expected="in (0, 1]")
        _check_int("top_k", self.top_k, low=-1, expected=">= 1, or -1/0 to disable")
        _check_float("min_p", self.min_p, low=0.0, high=1.0, expected="in [0, 1]")
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True, expected="> 0")
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0, expected="in [-2, 2]")
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0, expected="in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        _check_int("max_tokens", self.max_tokens, low=0, expected=">= 0 (0: prefill the prompt only)")
        if self.max_tokens == 0 and self.n > 1:  # the n samples would be n identical prefills for nothing
            raise ValueError(f"n must be 1 when max_tokens is 0 (nothing is generated, so every sample would be the "
                             f"same prompt), got n={self.n}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string, a list of strings or None, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_BELOW

    @property
    def has_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check_int(name: str, value: object, low: int, high: int | None = None, expected: str | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        expected = expected or (f">= {low}" if high is None else f"in [{low}, {high}]")
        raise ValueError(f"{name} must be an int {expected}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float | None = None, low_open: bool = False,
                 expected: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number {expected}, got {value!r}")
