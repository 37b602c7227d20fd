"""What one tensor-parallel rank holds of a model, from its config alone: weight bytes (as loaded, or quantized),
K/V bytes per token and DeltaNet state bytes per sequence. Computed by cutting the model built on the meta device
exactly as the ranks cut it (parallel/shard.py), so it cannot drift from what they load."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Qwen3NextConfig
from ..model.moe import Experts
from ..model.qwen3_next import Qwen3NextForCausalLM
from .plan import TPPlan
from .shard import shard_model

# Bytes per weight of the big matrices (projections and experts) under `--quantize`, scales included: int8 has a
# bf16 scale per output row, int4 a bf16 scale and zero per 64 inputs, bf16 storage none. lm_head is int8 in both
# integer schemes; the router, shared-expert gate, in_proj_ba, embeddings and norms stay in the load dtype.
_HIGH_PRECISION = ("lm_head", "mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_ba")


@dataclass(frozen=True)
class RankFootprint:
    rank: int
    weight_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int


def _weight_bytes(model: Qwen3NextForCausalLM, load_bytes: int, quantize: str | None) -> int:
    total = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        n = sum(p.numel() for _, p in own)
        big = isinstance(module, Experts) or (isinstance(module, torch.nn.Linear) and not any(
            name == h or name.endswith("." + h) for h in _HIGH_PRECISION))
        if quantize is None or not (big or name == "lm_head"):
            total += n * load_bytes
        elif quantize == "bf16":
            total += n * 2
        elif name == "lm_head" or quantize == "int8":
            rows = n // own[0][1].shape[-1]
            total += n + 2 * rows
        else:  # int4
            total += n // 2 + 4 * (n // 64)
    return total


def rank_footprints(config: Qwen3NextConfig, world: int, activation_bytes: int, load_bytes: int = 2,
                    quantize: str | None = None, include_mtp: bool = False) -> list[RankFootprint]:
    """Per rank of `world`: weights (`load_bytes` per parameter, or `quantize`d), K/V per token and DeltaNet state
    per sequence (`activation_bytes` per element, recurrent state in fp32); the MTP layer's K/V with `include_mtp`."""
    out = []
    for rank in range(world):
        plan = TPPlan(config, world, rank)
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(config)
        shard_model(model, plan)
        layout = model.cache_layout(include_mtp=include_mtp)
        out.append(RankFootprint(rank, _weight_bytes(model, load_bytes, quantize),
                                 layout.kv_bytes_per_token(activation_bytes),
                                 layout.state_bytes_per_slot(activation_bytes, 4)))
    return out
