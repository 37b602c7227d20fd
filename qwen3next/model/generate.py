"""The plain generation loop: prefill once, then one cached step per token. No batching, no engine.

It is the reference the engine's outputs are compared against, and what `generate` falls back to.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .qwen3_next import Qwen3NextForCausalLM


@torch.no_grad()
def generate_tokens(model: Qwen3NextForCausalLM, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                    seed: int | None = None, stop_token_ids: tuple[int, ...] = (),
                    kv_cache_dtype: str | torch.dtype | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids; greedy when temperature == 0, else sampling from softmax(logits / T).

    Stops after yielding a token in `stop_token_ids`. `kv_cache_dtype`: the K/V cache's dtype, as the engine's.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids: need at least one token")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    gen = torch.Generator(device=model.device)
    if seed is not None:
        gen.manual_seed(seed)
    cache = model.new_cache(1, len(prompt_ids) + max_tokens, kv_cache_dtype=kv_cache_dtype)
    logits = model(torch.tensor([prompt_ids], device=model.device), cache)[0, -1]
    for _ in range(max_tokens):
        if temperature == 0:
            tok = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
        yield tok
        if tok in stop_token_ids:
            return
        logits = model(torch.tensor([[tok]], device=model.device), cache)[0, -1]
