"""The model a run starts from: a fresh one (from a preset or a config.json) or the weights of an HF model dir."""

from __future__ import annotations

import argparse

import torch

from ..config import Qwen3NextConfig
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer
from .documents import DOC_SEPARATOR
from .presets import padded_vocab_size, preset_config


def _tokenizer_ids(tok: Tokenizer) -> tuple[int | None, int | None, int | None]:
    """(bos, eos, pad) for config.json: Qwen's convention bos = pad = <|endoftext|>, eos = the tokenizer's eos."""
    sep = tok.token_to_id(DOC_SEPARATOR)
    return sep, tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else sep


def build_model(args: argparse.Namespace, tok: Tokenizer) -> Qwen3NextForCausalLM:
    """A fresh (seeded) or loaded fp32 model whose vocab covers the tokenizer."""
    bos, eos, pad = _tokenizer_ids(tok)
    if args.init_from:
        model = Qwen3NextForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        if args.preset:
            config = preset_config(args.preset, padded_vocab_size(tok.vocab_size), bos, eos, pad)
        else:
            config = Qwen3NextConfig.from_pretrained(args.config)
            config.bos_token_id, config.eos_token_id, config.pad_token_id = bos, eos, pad
        config.torch_dtype = args.save_dtype
        torch.manual_seed(args.seed)
        model = Qwen3NextForCausalLM(config)
        model.init_weights(torch.Generator().manual_seed(args.seed))
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size: the model has {model.config.vocab_size} rows, the tokenizer "
                         f"{tok.vocab_size} ids")
    return model
