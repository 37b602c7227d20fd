"""What the engine hands back: the sampled tokens of each step turned into text, logprobs and stream events.

`SampleState.add_token` builds one sample's output (detokenizing, cutting at stop strings, logprobs);
`RequestState` streams the new part of it as `StreamEvent`s and marks the request done when all its samples are.
Prompt logprobs (vLLM's format: None for the first prompt token, then per token a dict token id -> `Logprob`) are
gathered per request as the prefill chunks compute them and ride on the first event of sample 0.
Stop strings are held back from the stream until they can no longer complete, so a client never sees one.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from ..tokenizer import IncrementalDetokenizer, Tokenizer
from ..tool_calls import parse_tool_calls
from .sequence import FinishReason, Sequence
from .stopping import StopRules


@dataclass(frozen=True)
class Logprob:
    """One token's entry in a prompt-logprobs dict (vLLM's `Logprob`): rank 1 = the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, logprob), ...]}
    stop_reason: str | int | None = None  # the stop string or token that ended it
    num_draft_tokens: int = 0  # speculative decoding: MTP drafts verified for this sample
    num_accepted_tokens: int = 0  # ... and accepted

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (None without speculative decoding)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs (see the module docstring)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when the (first sample's) prompt was admitted

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def acceptance_rate(self) -> float | None:
        """Speculative decoding: accepted / drafted tokens over all samples (None when nothing was drafted)."""
        drafted = sum(o.num_draft_tokens for o in self.outputs)
        return sum(o.num_accepted_tokens for o in self.outputs) / drafted if drafted else None

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in self.outputs)
        return {"prompt_tokens": len(self.prompt_token_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_token_ids) + completion}

    def tool_calls(self) -> tuple[str, list[dict]]:
        """(content, calls) parsed from the first output's `<tool_call>{json}</tool_call>` blocks."""
        return parse_tool_calls(self.text)


@dataclass
class StreamEvent:
    """New text/tokens of one sample of a request; `finish_reason` is set on its last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the first event of sample 0, when the request asked


def logprob_entry(sampled, j: int, token: int, top_n: int | None) -> dict:
    """The logprobs record of row `j` of a sampler output: {"token_id", "logprob"} and, when `top_n`, "top"."""
    entry = {"token_id": token, "logprob": float(sampled.logprobs[j])}
    if top_n and sampled.top_token_ids is not None:
        entry["top"] = list(zip(sampled.top_token_ids[j, :top_n].tolist(), sampled.top_logprobs[j, :top_n].tolist()))
    return entry


def prompt_logprob_dicts(chunk, decode) -> list[dict[int, Logprob]]:
    """vLLM's per-token dicts from a runner's `PromptLogprobs` (one span of positions): the prompt token first,
    then the top N in rank order; `decode(token_id)` gives a token's text."""
    out = []
    for token, lp, rank, ids, lps in zip(chunk.token_ids, chunk.logprobs, chunk.ranks, chunk.top_token_ids,
                                         chunk.top_logprobs):
        d = {token: Logprob(lp, rank, decode(token))}
        for r, (t, v) in enumerate(zip(ids, lps), 1):
            if t not in d:
                d[t] = Logprob(v, r, decode(t))
        out.append(d)
    return out


class SampleState:
    """The output of one sample (one sequence) as it grows."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer | None):
        """`tokenizer` None: token ids only (the text stays empty)."""
        self.seq = seq
        self.out = CompletionOutput(index=seq.sample_index, logprobs=[] if seq.params.logprobs is not None else None)
        self.detok = (IncrementalDetokenizer(tokenizer, skip_special_tokens=seq.params.skip_special_tokens)
                      if tokenizer is not None else None)
        self.full_text = ""  # everything decoded so far (before stop-string truncation)
        self.emitted = 0  # characters of out.text already streamed
        self.emitted_tokens = 0

    def record_verification(self, num_drafts: int, num_accepted: int) -> None:
        self.out.num_draft_tokens += num_drafts
        self.out.num_accepted_tokens += num_accepted

    def add_token(self, token: int, logprob: dict | None) -> str | None:
        """Add the next of the tokens the scheduler has appended to the sequence (with its logprobs record when the
        request asked for logprobs). Returns the finish reason when the sample ends here, else None."""
        seq, out = self.seq, self.out
        out.token_ids.append(token)
        # A speculative step appends several tokens; only the sequence's last one can have finished it.
        ended = seq.is_finished and len(out.token_ids) == seq.num_output_tokens
        finished_by_token = ended and seq.finish_reason == FinishReason.STOP
        if out.logprobs is not None:
            out.logprobs.append(logprob)
        if self.detok is not None and not finished_by_token:  # the text of an EOS / stop token is not output
            self.full_text += self.detok.push(token)
        if self.detok is not None and ended:
            self.full_text += self.detok.flush()
        stop_at = StopRules.by_text(self.full_text, seq.params.stop, len(out.text))
        if stop_at is not None:
            pos, out.stop_reason = stop_at
            out.text = self.full_text[:pos]
            return FinishReason.STOP.value
        out.text = self.full_text
        if not ended:
            return None
        if finished_by_token:
            out.stop_reason = token
        return seq.finish_reason.value

    def take_event(self, holdback: int = 0, finish_reason: str | None = None) -> StreamEvent | None:
        """The not yet streamed part of the output, keeping back its last `holdback` characters; None if empty."""
        out = self.out
        end = max(self.emitted, len(out.text) - holdback)
        text = out.text[self.emitted:end]
        toks = out.token_ids[self.emitted_tokens:]
        if not text and not toks and finish_reason is None:
            return None
        logprobs = out.logprobs[self.emitted_tokens:] if out.logprobs is not None else None
        self.emitted, self.emitted_tokens = end, len(out.token_ids)
        return StreamEvent(out.index, text, toks, logprobs, finish_reason)


class RequestState:
    """One request in the engine: its samples and the event queue its client reads (None ends the stream)."""

    def __init__(self, request_id: str, prompt_ids: list[int], samples: list[SampleState]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.samples = samples
        self.events: queue.Queue[StreamEvent | None] = queue.Queue()
        self.done = threading.Event()
        asked = bool(samples) and samples[0].seq.params.prompt_logprobs is not None
        self.prompt_logprobs: PromptLogprobs | None = [None] if asked else None
        self._prompt_logprobs_sent = False

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_ids, [s.out for s in self.samples], self.done.is_set(),
                             self.prompt_logprobs, self.samples[0].seq.num_cached_tokens)

    def add_prompt_logprobs(self, first: int, entries: list[dict[int, Logprob]]) -> None:
        """The logprobs of the prompt tokens after positions first, first + 1, ... (computed in order)."""
        assert len(self.prompt_logprobs) == first + 1, "prompt logprobs computed twice or out of order"
        self.prompt_logprobs += entries

    def _put(self, s: SampleState, ev: StreamEvent) -> None:
        # Sample 0 computes the prompt logprobs: by its first event its prompt is all prefilled.
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent and s.seq.sample_index == 0:
            ev.prompt_logprobs = self.prompt_logprobs
            self._prompt_logprobs_sent = True
        self.events.put(ev)

    def emit(self, s: SampleState) -> None:
        """Stream what `s` has produced, except what a stop string may still claim."""
        ev = s.take_event(holdback=StopRules.holdback(s.seq.params.stop))
        if ev is not None:
            self._put(s, ev)

    def finish_sample(self, s: SampleState, reason: str) -> bool:
        """Close `s` with `reason` and stream its rest; returns True when that was the request's last sample."""
        s.out.finish_reason = reason
        self._put(s, s.take_event(0, reason))
        if any(x.out.finish_reason is None for x in self.samples):
            return False
        self.done.set()
        self.events.put(None)
        return True
