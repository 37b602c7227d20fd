"""What one tensor-parallel rank holds of a model, from its config alone: weight bytes (as loaded, or quantized),
K/V bytes per token and DeltaNet state bytes per sequence. Computed on the model built on the meta device, cut
exactly as the ranks cut it (parallel/shard.py) and then quantized by the quantizer's own module swaps (quant/), as
each rank quantizes its shard after loading it (parallel/engine.py), so it cannot drift from what they hold."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..checkpoint import quantize_bits
from ..config import Qwen3NextConfig
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..quant.quantize import store_bf16, swap_in_empty_quantized
from .plan import TPPlan
from .shard import shard_model


@dataclass(frozen=True)
class RankFootprint:
    rank: int
    weight_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int


def _weight_bytes(model: Qwen3NextForCausalLM, load_bytes: int, quantize: str | None) -> int:
    """Bytes of the weights of `model` (a rank's shard, float32 on the meta device, its config not quantized) once
    loaded at `load_bytes` per element and `quantize`d, in place.

    `quantize` runs the real conversion on the meta model: `swap_in_empty_quantized` (the modules and tensors of
    `quantize_model`, default group size included: int4 leaves float what the group size does not divide, lm_head
    is int8, tied lm_head and the high-precision modules stay float) or `store_bf16`. Weights are the parameters
    and persistent buffers (`state_dict`), each tensor once (a tied lm_head is the embedding); the non-persistent
    RoPE frequencies are derived from the config, not weights. A float32 tensor is one kept in the load dtype
    (`load_bytes` each); any other dtype is what quantization made it (int8/uint8 codes, bf16 scales and zeros,
    bf16 storage): its own element size. bf16 storage computes in float32 (`store_bf16` refuses another dtype), so
    what it keeps is 4 bytes an element whatever `load_bytes` says."""
    bits = quantize_bits(quantize)
    if bits == 16:
        store_bf16(model)
        load_bytes = 4
    elif bits is not None:
        swap_in_empty_quantized(model, bits)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
    return sum(t.numel() * (load_bytes if t.dtype == torch.float32 else t.element_size()) for t in tensors)


def rank_footprints(config: Qwen3NextConfig, world: int, activation_bytes: int, load_bytes: int = 2,
                    quantize: str | None = None, include_mtp: bool = False) -> list[RankFootprint]:
    """Per rank of `world`: weights (`load_bytes` per element, or `quantize`d as by `--quantize`; see
    `_weight_bytes`), K/V per token and DeltaNet state per sequence (`activation_bytes` per element, recurrent state
    in fp32); the MTP layer's K/V with `include_mtp` (its weights always count)."""
    out = []
    for rank in range(world):
        plan = TPPlan(config, world, rank)
        # Its own copy of the config: quantizing records the scheme in it. A float model is what gets quantized (an
        # FP8 checkpoint loads as one).
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(dataclasses.replace(config, quantization_config=None))
        shard_model(model, plan)
        layout = model.cache_layout(include_mtp=include_mtp)
        out.append(RankFootprint(rank, _weight_bytes(model, load_bytes, quantize),
                                 layout.kv_bytes_per_token(activation_bytes),
                                 layout.state_bytes_per_slot(activation_bytes, 4)))
    return out
