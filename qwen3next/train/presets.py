"""Named model configurations for training from scratch.

Every preset keeps the full Qwen3-Next architecture (Gated DeltaNet : gated attention = 3 : 1, sparse MoE with a
shared expert on every layer, one MTP layer); they differ only in size. `vocab_size` in a preset is nominal: the
trainer replaces it with the tokenizer's size rounded up to a multiple of 64 (`padded_vocab_size`).

- `tiny`: ~0.1M parameters with a toy vocab, for tests.
- `demo`: trains on 2 CPU cores in about 80 minutes and saves to < 40 MB in bf16 with an 8k (+26 specials) vocab.
- `small`: the issue's model (64 experts, top-4, 32k vocab): 151.4M total (165.9M with MTP); 40.7M active, or
  57.0M when the embedding rows are counted as the issue does.
"""

from __future__ import annotations

import copy
from typing import Any

from ..config import Qwen3NextConfig

_COMMON: dict[str, Any] = {
    "model_type": "qwen3_next",
    "hidden_act": "silu",
    "full_attention_interval": 4,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000.0,
    "linear_conv_kernel_dim": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    # 19.2M parameters with MTP (38 MB in bf16), 8.2M active. Measured (AVX2 EPYC, fp32, busy machine) ~400
    # tokens per CPU-second; halving the expert widths bought < 10%, since lm_head (run twice: LM + MTP) and
    # per-op overheads dominate. Expect ~2-3M tokens in 80 minutes on 2 cores.
    "demo": {
        **_COMMON,
        "vocab_size": 8256,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 192,
        "shared_expert_intermediate_size": 256,
    },
    "small": {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_num_key_heads": 8,
        "linear_num_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
    },
}


def padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """The embedding rows for a tokenizer of `num_tokens` ids: rounded up to `multiple` (faster matmuls)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens: expected a positive integer, got {num_tokens}")
    return -(-num_tokens // multiple) * multiple


def preset_dict(name: str) -> dict[str, Any]:
    """A copy of the preset's `config.json` dict."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str, vocab_size: int | None = None, bos_token_id: int | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  hf_overrides: dict[str, Any] | None = None) -> Qwen3NextConfig:
    """The preset as a config; `vocab_size` and the special-token ids, when given, replace the nominal ones;
    `hf_overrides` then changes config.json values (`Qwen3NextConfig.from_dict`)."""
    d = preset_dict(name)
    if vocab_size is not None:
        d["vocab_size"] = vocab_size
    config = Qwen3NextConfig.from_dict(d, hf_overrides)
    # set after parsing: from_dict treats None as "absent" and would fall back to the 80B model's ids
    config.bos_token_id, config.eos_token_id, config.pad_token_id = bos_token_id, eos_token_id, pad_token_id
    return config
