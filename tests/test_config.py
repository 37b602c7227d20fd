"""Qwen3NextConfig: both config.json spellings, validation, and the derived sizes (parameter counts, cache bytes)."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next.config import RopeConfig
from qwen3next.model.cache import HybridCache
from qwen3next.model.moe import SparseMoE
from tiny_models import CONFIGS, config_dict

# The official Qwen3-Next-80B-A3B-Instruct config.json (no MTP key, although the checkpoint ships mtp.*).
OFFICIAL = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
    "full_attention_interval": 4, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_scaling": None, "max_position_embeddings": 262144,
    "attention_dropout": 0.0, "use_sliding_window": False, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32, "hidden_act": "silu",
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "intermediate_size": 5120, "router_aux_loss_coef": 0.001, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "initializer_range": 0.02, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "use_cache": True,
}


# ---- the official config and its derived numbers (parameter counts, cache and state bytes) ---------------------------
def test_official_config_parses():
    c = Qwen3NextConfig.from_dict(OFFICIAL)
    assert c.attention_layers == list(range(3, 48, 4))
    assert len(c.linear_layers) == 36
    assert all(c.is_moe_layer(i) for i in range(48))
    assert c.num_nextn_predict_layers == 1  # absent key: one MTP layer, as vLLM assumes
    assert c.rope == RopeConfig(theta=1e7, partial_rotary_factor=0.25)
    assert c.rotary_dim == 64 and c.conv_dim == 8192
    assert c.torch_dtype == "bfloat16"


def test_official_parameter_counts():
    counts = Qwen3NextConfig.from_dict(OFFICIAL).parameter_counts()
    assert counts["total"] == 79_674_391_296
    assert counts["mtp"] == 1_650_471_424
    assert counts["total_with_mtp"] == 81_324_862_720
    assert counts["active"] == 3_563_764_480  # lm_head counted, the embedding gather not
    assert counts["embedding"] == 311_164_928
    assert counts["total"] - 2 * counts["embedding"] == 79_052_061_440  # the card's "non-embedding 79B"
    assert counts["active"] - counts["embedding"] == 3_252_599_552  # "A3B"


def test_official_cache_sizes():
    c = Qwen3NextConfig.from_dict(OFFICIAL)
    assert c.kv_bytes_per_token() == 24 * 1024  # 12 layers x K,V x 2 heads x 256 x bf16
    assert c.kv_bytes_per_token(include_mtp=True) == 26 * 1024
    # per DeltaNet layer: conv state of W-1 = 3 frames x 8192 channels (bf16) + S [32, 128, 128] fp32
    per_layer = 3 * 8192 * 2 + 32 * 128 * 128 * 4
    assert c.state_bytes_per_sequence() == 36 * per_layer
    assert round(c.state_bytes_per_sequence() / 2**20, 1) == 73.7
    assert round(c.state_bytes_per_sequence(state_dtype_bytes=2) / 2**20, 1) == 37.7
    assert c.kv_bytes_per_token() * 262_144 == 6 * 2**30


def _real_counts(model: Qwen3NextForCausalLM) -> tuple[int, int]:
    """(main, mtp) parameter totals of an instantiated model; tied weights counted once."""
    seen: set[int] = set()
    main = mtp = 0
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if n.startswith("mtp."):
            mtp += p.numel()
        else:
            main += p.numel()
    return main, mtp


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": True}, {"num_nextn_predict_layers": 0},
    {"decoder_sparse_step": 2, "mlp_only_layers": [3]}, {"num_experts": 0, "num_nextn_predict_layers": 0},
    *[{k: v for k, v in CONFIGS[n].items() if k not in CONFIGS["base"] or v != CONFIGS["base"][k]}
      for n in ("mlp_only", "yarn")],
])
def test_parameter_counts_match_an_instantiated_model(overrides):
    d = {k: v for k, v in {**config_dict("base"), **overrides}.items() if v is not None}
    c = Qwen3NextConfig.from_dict(d)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(c)
    main, mtp = _real_counts(model)
    counts = c.parameter_counts()
    assert counts["total"] == main
    assert counts["mtp"] == mtp
    assert counts["total_with_mtp"] == main + mtp
    assert counts["embedding"] == c.vocab_size * c.hidden_size
    # active: every parameter except the embedding gather and the routed experts that a token does not visit
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    idle = (c.num_experts - c.num_experts_per_tok) * expert
    n_moe = sum(isinstance(layer.mlp, SparseMoE) for layer in model.model.layers)
    embed = 0 if c.tie_word_embeddings else counts["embedding"]  # tied: the head is the same matrix
    assert counts["active"] == main - embed - n_moe * idle
    assert counts["mtp_active"] == mtp - c.num_nextn_predict_layers * idle


@pytest.mark.parametrize("name", ["base", "mlp_only"])
def test_cache_sizes_match_allocated_cache(name):
    c = Qwen3NextConfig.from_dict({**config_dict(name), "num_nextn_predict_layers": 1})
    cache = HybridCache(c, num_slots=1, num_blocks=1, block_size=1, dtype=torch.bfloat16, state_dtype=torch.float32)
    assert cache.nbytes() == c.kv_bytes_per_token(include_mtp=True) + c.state_bytes_per_sequence()


# ---- spellings ------------------------------------------------------------------------------------------------------
V4_YARN = {"rope_theta": 1e6, "partial_rotary_factor": 0.5, "max_position_embeddings": 256,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16,
                            "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 0.5, "truncate": False}}
V5_YARN = {"max_position_embeddings": 256,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "partial_rotary_factor": 0.5, "factor": 4.0,
                               "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
                               "mscale": 0.7, "mscale_all_dim": 0.5, "truncate": False}}


def test_rope_spellings_agree():
    v4 = Qwen3NextConfig.from_dict({**config_dict("base"), **V4_YARN})
    base_v5 = {k: v for k, v in config_dict("base").items() if k not in ("rope_theta", "partial_rotary_factor")}
    v5 = Qwen3NextConfig.from_dict({**base_v5, **V5_YARN})
    assert v4.rope == v5.rope
    assert v4.rope == RopeConfig(theta=1e6, partial_rotary_factor=0.5, rope_type="yarn", factor=4.0,
                                 original_max_position_embeddings=32, beta_fast=16.0, beta_slow=2.0, mscale=0.7,
                                 mscale_all_dim=0.5, attention_factor=None, truncate=False)
    assert v4.rotary_dim == 8
    # default rope, both spellings
    a = Qwen3NextConfig.from_dict({"rope_theta": 5e5, "partial_rotary_factor": 0.5})
    b = Qwen3NextConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5,
                                                       "partial_rotary_factor": 0.5}})
    assert a.rope == b.rope == RopeConfig(theta=5e5, partial_rotary_factor=0.5)


def test_rope_matches_transformers_reading():
    transformers = pytest.importorskip("transformers")
    for d in (V4_YARN, V5_YARN, {"rope_theta": 5e5, "partial_rotary_factor": 0.5}):
        ours = Qwen3NextConfig.from_dict(d).rope
        theirs = transformers.Qwen3NextConfig(**json.loads(json.dumps(d))).rope_parameters
        assert ours.rope_type == theirs["rope_type"]
        assert ours.theta == theirs["rope_theta"]
        assert ours.partial_rotary_factor == theirs["partial_rotary_factor"]
        if ours.rope_type == "yarn":
            for field in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "truncate"):
                assert getattr(ours, field) == theirs[field], field


def test_yarn_defaults_and_derived_factor():
    r = Qwen3NextConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}).rope
    assert (r.beta_fast, r.beta_slow, r.truncate, r.mscale, r.attention_factor) == (32.0, 1.0, True, None, None)
    assert r.original_max_position_embeddings is None  # the rope code falls back to max_position_embeddings
    # no factor: the ratio of the context lengths, as transformers derives it
    r = Qwen3NextConfig.from_dict({"max_position_embeddings": 1024,
                                   "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 256}}).rope
    assert r.factor == 4.0 and r.original_max_position_embeddings == 256
    # a top-level original_max_position_embeddings wins
    r = Qwen3NextConfig.from_dict({"original_max_position_embeddings": 128, "rope_scaling": {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "attention_factor": 1.5}}).rope
    assert r.original_max_position_embeddings == 128 and r.attention_factor == 1.5
    # rope_scaling for the default type carries nothing
    assert Qwen3NextConfig.from_dict({"rope_scaling": None}).rope == RopeConfig()


def test_layer_types_and_interval_agree():
    a = Qwen3NextConfig.from_dict({"num_hidden_layers": 8, "full_attention_interval": 4})
    b = Qwen3NextConfig.from_dict({"num_hidden_layers": 8, "layer_types": ["linear_attention"] * 3 + ["full_attention"]
                                   + ["linear_attention"] * 3 + ["full_attention"]})
    assert a.layer_types == b.layer_types and a == b
    assert a.attention_layers == [3, 7]
    c = Qwen3NextConfig.from_dict({"num_hidden_layers": 6, "full_attention_interval": 3})
    assert c.attention_layers == [2, 5] and c.linear_layers == [0, 1, 3, 4]
    # explicit layer_types win over the interval; None means the default interval 4
    d = Qwen3NextConfig.from_dict({"num_hidden_layers": 3, "full_attention_interval": 2,
                                   "layer_types": ["full_attention"] * 3})
    assert d.attention_layers == [0, 1, 2]
    e = Qwen3NextConfig.from_dict({"num_hidden_layers": 4, "full_attention_interval": None})
    assert e.attention_layers == [3]


def test_layer_pattern_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for d in ({"num_hidden_layers": 6, "full_attention_interval": 2},
              {"num_hidden_layers": 7, "full_attention_interval": 3}):
        assert Qwen3NextConfig.from_dict(d).layer_types == transformers.Qwen3NextConfig(**d).layer_types


def test_which_layers_are_moe():
    d = {**config_dict("base"), "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3, 6]}
    c = Qwen3NextConfig.from_dict(d)
    moe = [i for i in range(8) if c.is_moe_layer(i)]
    assert moe == [1, 5, 7]  # odd layers (step 2), minus layer 3
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(c)
    assert [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoE)] == moe
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**d))
    hf_moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert hf_moe == moe
    dense = Qwen3NextConfig.from_dict({**d, "num_experts": 0, "num_nextn_predict_layers": 0})
    assert not any(dense.is_moe_layer(i) for i in range(8))


def test_unknown_keys_ignored_and_dtype_spellings():
    plain = Qwen3NextConfig.from_dict(config_dict("base"))
    noisy = Qwen3NextConfig.from_dict({**config_dict("base"), "use_sliding_window": False, "sliding_window": None,
                                       "attention_dropout": 0.0, "transformers_version": "5.0", "foo": {"bar": 1},
                                       "architectures": ["X"], "use_cache": True})
    assert noisy == plain
    assert Qwen3NextConfig.from_dict({"dtype": "float32"}).torch_dtype == "float32"  # transformers v5 key
    assert Qwen3NextConfig.from_dict({"torch_dtype": "float16", "dtype": "float32"}).torch_dtype == "float16"


# ---- round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["base", "mlp_only", "yarn"])
def test_to_dict_round_trip(name, tmp_path):
    c = Qwen3NextConfig.from_dict({**config_dict(name), "num_nextn_predict_layers": 1})
    assert Qwen3NextConfig.from_dict(c.to_dict()) == c
    c.save(tmp_path / "config.json")
    assert Qwen3NextConfig.from_pretrained(tmp_path) == c
    assert Qwen3NextConfig.from_pretrained(tmp_path / "config.json") == c
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3NextConfig.from_pretrained(tmp_path)
    assert hf.layer_types == c.layer_types
    assert hf.mlp_only_layers == c.mlp_only_layers
    assert hf.rope_parameters["rope_theta"] == c.rope.theta
    assert hf.rope_parameters["partial_rotary_factor"] == c.rope.partial_rotary_factor
    assert hf.rope_parameters["rope_type"] == c.rope.rope_type
    if c.rope.rope_type == "yarn":
        assert hf.rope_parameters["factor"] == c.rope.factor
        assert hf.rope_parameters["original_max_position_embeddings"] == c.rope.original_max_position_embeddings


# ---- validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_attention_heads": 5}, "num_attention_heads"),  # 2 KV heads
    ({"linear_num_value_heads": 5}, "linear_num_value_heads"),  # 2 key heads
    ({"num_experts_per_tok": 7}, "num_experts_per_tok"),  # 6 experts
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]},
     "layer_types[1]"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types"),
    ({"layer_types": "linear_attention"}, "layer_types"),
    ({"hidden_size": -48}, "hidden_size"),
    ({"head_dim": 0}, "head_dim"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"num_hidden_layers": "four"}, "num_hidden_layers"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"moe_intermediate_size": -24}, "moe_intermediate_size"),
    ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size"),
    ({"num_experts": -6}, "num_experts"),
    ({"intermediate_size": 0, "mlp_only_layers": [0]}, "intermediate_size"),
    ({"mlp_only_layers": [4]}, "mlp_only_layers"),
    ({"mlp_only_layers": 1}, "mlp_only_layers"),
    ({"full_attention_interval": 0}, "full_attention_interval"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
])
def test_impossible_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        Qwen3NextConfig.from_dict({**config_dict("base"), **overrides})
    assert str(info.value).startswith(field) or f"{field}:" in str(info.value) or f"{field} (" in str(info.value), \
        str(info.value)


def test_from_dict_rejects_non_objects():
    with pytest.raises(ValueError, match="config"):
        Qwen3NextConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3NextConfig.from_pretrained(tmp_path)
    f = tmp_path / "config.json"
    f.write_text("{\"hidden_size\": ")
    with pytest.raises(ValueError, match="config.json.*JSON"):
        Qwen3NextConfig.from_pretrained(tmp_path)
    f.write_text(json.dumps({"model_type": "qwen3_next", "num_attention_heads": 3}))
    with pytest.raises(ValueError, match="config.json: num_attention_heads"):
        Qwen3NextConfig.from_pretrained(tmp_path)
