"""parallel/footprint.py against the real thing: tiny random models, cut to a rank's share (`shard_model`, no
process group: without a comm it only slices) and quantized by `quantize_model` / `store_bf16` exactly as a rank
does after loading, hold exactly the weight bytes the footprint computes from their config alone."""

from __future__ import annotations

import pytest
import torch

from qwen3next.checkpoint import quantize_bits
from qwen3next.config import Qwen3NextConfig
from qwen3next.model.qwen3_next import Qwen3NextForCausalLM
from qwen3next.parallel.footprint import rank_footprints
from qwen3next.parallel.plan import TPPlan
from qwen3next.parallel.shard import shard_model
from qwen3next.quant import quantize_model
from tiny_models import config_dict

CONFIGS = {
    # in_features 48 (hidden) and 24 (expert down): int4 leaves nearly everything float; int8 expert scales are per
    # row of gate_up (2I = 48) and of down (D = 48), not per row of a matrix D wide
    "base": {},
    # tied lm_head (it is the embedding: counted once, never quantized), odd vocabulary split unevenly over 2 ranks
    "tied": {"tie_word_embeddings": True, "hidden_size": 64},
    # int4 quantizes what 64 divides and leaves the rest float, per rank: experts and in_proj_qkvz (64 in) always;
    # o_proj (4 heads x 16 = 64 in) on one rank, not on two (32); the shared expert's down_proj (128 in) on one and
    # two ranks; the dense MLP's down_proj (40 in) and DeltaNet's out_proj (32 in) never
    "int4_mixed": {"hidden_size": 64, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
                   "intermediate_size": 40, "mlp_only_layers": [1]},
}
SHARDS = [(1, 0), (2, 0), (2, 1)]  # (world, rank)
# (--quantize, load dtype); bf16 storage needs a float32 model
SCHEMES = [pytest.param(q, dtype, id=f"{q or 'none'}-{str(dtype).removeprefix('torch.')}")
           for q, dtype in [(None, torch.float32), (None, torch.bfloat16), ("bf16", torch.float32),
                            ("int8", torch.float32), ("int8", torch.bfloat16), ("int4", torch.float32),
                            ("int4", torch.bfloat16)]]


def held_bytes(model: Qwen3NextForCausalLM) -> int:
    """Bytes of memory the model's parameters and buffers hold, each storage once (a tied weight is one storage), the
    RoPE frequencies left out (derived from the config, not a weight)."""
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n != "rope_inv_freq")]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("world,rank", SHARDS)
@pytest.mark.parametrize("quantize,dtype", SCHEMES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_footprint_is_what_a_rank_holds(name, quantize, dtype, world, rank):
    config = Qwen3NextConfig.from_dict({**config_dict("base"), **CONFIGS[name]})
    predicted = rank_footprints(config, world, 2, dtype.itemsize, quantize)[rank].weight_bytes
    assert config.quantization_config is None  # the footprint quantizes a copy

    model = Qwen3NextForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(dtype)
    shard_model(model, TPPlan(config, world, rank))
    bits = quantize_bits(quantize)
    if bits is not None:
        quantize_model(model, bits)
    assert predicted == held_bytes(model)


def test_bf16_storage_keeps_the_rest_in_float32():
    """bf16 storage computes in float32: what it does not convert is 4 bytes an element whatever the load dtype."""
    config = Qwen3NextConfig.from_dict(config_dict("base"))
    assert rank_footprints(config, 2, 2, 2, "bf16") == rank_footprints(config, 2, 2, 4, "bf16")
