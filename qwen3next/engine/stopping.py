"""When a sequence is finished: every rule in one place. Plain Python, no torch.

| reason | rule                                                                      | checked by                   |
|--------|---------------------------------------------------------------------------|------------------------------|
| stop   | the sampled token is an EOS token (unless `ignore_eos`) or in `stop_token_ids` | `Scheduler.update`      |
| length | `max_tokens` tokens generated, or prompt + output reached `max_model_len` | `Scheduler.update`           |
| length | `max_tokens` is 0 (prompt logprobs only) and the whole prompt is cached   | `Scheduler.update`           |
| stop   | the decoded text holds one of the `stop` strings (the text ends before it) | the engine's output stage   |
| abort  | the client gave up (`Engine.abort`)                                       | -                            |

The token rules run as the scheduler appends a sampled token, so a finished sequence never takes another step;
stop strings need the decoded text, so the engine checks them after detokenizing and ends the sequence through
`Scheduler.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import FinishReason, Sequence


@dataclass(frozen=True)
class StopRules:
    eos_token_ids: tuple[int, ...]
    max_model_len: int

    def by_token(self, seq: Sequence) -> FinishReason | None:
        """Why `seq` ends with the token it has just appended, or None while it goes on."""
        token, p = seq.last_token_id, seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def by_text(text: str, stops: list[str], searched: int) -> tuple[int, str] | None:
        """(position, stop string) of the earliest stop string in `text`, or None.

        Only matches ending past `searched` are new: the first `searched` characters were checked before.
        """
        best = None
        for stop in stops:
            i = text.find(stop, max(0, searched - len(stop) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        return best

    @staticmethod
    def holdback(stops: list[str]) -> int:
        """Characters a stream keeps back while the sequence runs: a stop string may still end within them."""
        return max((len(x) for x in stops), default=1) - 1
