"""Per-request sampling parameters (OpenAI / vLLM names and semantics). Plain Python, no torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
# Temperatures below this sample greedily (as in vLLM): logits / T would overflow float32 into inf/NaN, and such a
# temperature stands for the argmax anyway.
GREEDY_TEMPERATURE_BELOW = 1e-5


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, vLLM's `StructuredOutputsParams`: exactly one of

    - `json`: a JSON schema (a dict or its JSON text) the output must validate against;
    - `json_object`: True for any JSON object (OpenAI's `response_format: {"type": "json_object"}`);
    - `regex`: a regular expression (Rust `regex` syntax) the whole output must match;
    - `choice`: a list of strings, the output is one of them;
    - `grammar`: a context-free grammar in Lark syntax (llguidance's dialect: `%json {schema}` embeds a schema,
      `<token>` names a special token) or in llama.cpp's GBNF.

    Decoding then masks every token that would leave the constraint (engine/structured.py; llguidance compiles
    it): the output matches by construction unless it is cut short (max_tokens, a stop string). JSON is written
    the way Python's json.dumps and the model's chat format write it (", " and ": ", no newlines), and an object
    schema that lists its properties gets no other keys unless it says `additionalProperties` (as xgrammar, vLLM's
    default backend, does)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    # JSON whitespace: none by default (", " and ": " only); a regex here allows that whitespace between tokens.
    # vLLM's disable_any_whitespace is accepted for compatibility: free whitespace is off either way.
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.whitespace_pattern is not None and (not isinstance(self.whitespace_pattern, str)
                                                    or not self.whitespace_pattern):
            raise ValueError(f"structured_outputs.whitespace_pattern must be a non-empty string, got "
                             f"{self.whitespace_pattern!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"structured_outputs.disable_any_whitespace must be true or false, got "
                             f"{self.disable_any_whitespace!r}")
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object is not False:
            if self.json_object is not True:
                raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured_outputs: give exactly one of json, json_object, regex, choice, grammar"
                             + (f" (got {', '.join(given)})" if given else ""))
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json: not valid JSON ({e})") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")
        if self.choice is not None:
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        return "json_object" if self.json_object else next(
            n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None)

    @classmethod
    def parse(cls, value: StructuredOutputsParams | dict | None) -> StructuredOutputsParams | None:
        if value is None or isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs: expected an object such as {{\"json\": {{...}}}}, got {value!r}")
        if "structural_tag" in value:
            raise ValueError("structured_outputs.structural_tag is not supported; tool calls are constrained by the "
                             "server's tool_choice, other formats by a Lark grammar (grammar)")
        known = {"json", "regex", "choice", "grammar", "json_object", "whitespace_pattern", "disable_any_whitespace"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**value)


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
    needs `n` 1. `structured_outputs` (vLLM's name; a `StructuredOutputsParams` or a dict of its fields) constrains
    the output to a JSON schema, a regex, a choice or a grammar.
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
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None

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
        self.structured_outputs = StructuredOutputsParams.parse(self.structured_outputs)

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
