"""Tiny random Qwen3-Next configurations shared by the tests (sizes chosen to hit odd cases cheaply)."""

from __future__ import annotations

import copy
import zlib

import torch

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM

BASE = {
    "model_type": "qwen3_next",
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 40,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "num_experts": 6,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 20,
    "full_attention_interval": 4,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

CONFIGS = {
    # the production pattern (3 x DeltaNet, 1 x attention), K != V head dims
    "base": BASE,
    # dense MLP layers, explicit layer_types, head/expert counts that are not powers of two
    "mlp_only": {**BASE, "num_hidden_layers": 5, "mlp_only_layers": [1, 4], "num_attention_heads": 3,
                 "num_key_value_heads": 1, "linear_num_key_heads": 3, "linear_num_value_heads": 6,
                 "num_experts": 5, "num_experts_per_tok": 2, "full_attention_interval": None,
                 "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                                 "full_attention"]},
    # YaRN rope scaling, positions beyond original_max_position_embeddings
    "yarn": {**BASE, "num_hidden_layers": 4, "partial_rotary_factor": 0.5, "max_position_embeddings": 256,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
}


def config_dict(name: str) -> dict:
    d = copy.deepcopy(CONFIGS[name])
    return {k: v for k, v in d.items() if v is not None}


def make_model(name: str = "base", seed: int = 0, dtype: torch.dtype = torch.float32,
               mtp: bool = True, **overrides) -> Qwen3NextForCausalLM:
    d = {**config_dict(name), **overrides}
    d["num_nextn_predict_layers"] = 1 if mtp else 0
    config = Qwen3NextConfig.from_dict(d)
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    # Larger-than-init norms and gates so that every branch matters numerically in the comparisons.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 and not n.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))) * 0.1)
            elif p.ndim >= 2:
                p.mul_(4.0)
    return model.to(dtype).eval()


BYTE_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def write_byte_tokenizer(path) -> None:
    """A real `tokenizer.json`: byte-level BPE with no merges (ids 0..255 = bytes) + ChatML specials from 256."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from qwen3next.train.tokenizer_build import byte_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in BYTE_ADDED_TOKENS if t.startswith("<|")])
    tok.add_tokens([AddedToken(t, special=False) for t in BYTE_ADDED_TOKENS if not t.startswith("<|")])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
