"""Saving and finding checkpoints, and writing a complete HF model directory.

`OUTPUT/checkpoint-NNNNNNN/` = an HF model dir (weights in `--save-dtype`) + tokenizer files + `trainer_state.pt`
(fp32 weights, optimizer, step, RNG, counters, the run's arguments and a data fingerprint).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import parse_dtype
from ..config import Qwen3NextConfig
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")
STATE_FILE = "trainer_state.pt"


def write_generation_config(out: Path, tok: Tokenizer, config: Qwen3NextConfig) -> None:
    """Write `generation_config.json`: the tokenizer's stop ids and the sampling defaults that Qwen3 Instruct models
    ship with (temperature 0.7, top-p 0.8, top-k 20)."""
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": tok.eos_token_ids,
           "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def save_model_dir(out: Path, model: Qwen3NextForCausalLM, save_dtype: torch.dtype, tok: Tokenizer,
                   tokenizer_dir: Path) -> None:
    """A complete HF model dir: config + weights (in `save_dtype`) + tokenizer files + generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    to_save = model if model.dtype == save_dtype else copy.deepcopy(model).to(save_dtype)
    to_save.save_pretrained(out)
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    write_generation_config(out, tok, model.config)


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # input tokens trained on
    elapsed: float = 0.0  # training seconds over all sessions


def save_checkpoint(output: Path, model: Qwen3NextForCausalLM, optimizer: torch.optim.Optimizer, progress: Progress,
                    args: argparse.Namespace, data_key: str, tok: Tokenizer, tokenizer_dir: Path) -> Path:
    """Write `output/checkpoint-NNNNNNN` through a temporary dir (an interrupted save never looks complete)."""
    final = output / f"checkpoint-{progress.step:07d}"
    tmp = output / f".tmp-checkpoint-{progress.step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(tmp, model, parse_dtype(args.save_dtype), tok, tokenizer_dir)
    state = {"step": progress.step, "tokens": progress.tokens, "elapsed": progress.elapsed,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
             "data_key": data_key}
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    old = sorted(p for p in output.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    for p in old[: max(0, len(old) - args.keep_checkpoints)]:
        shutil.rmtree(p)
    return final


def find_checkpoint(output: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"--resume: {path} has no {STATE_FILE}")
        return path
    found = sorted(p for p in output.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    if not found:
        raise ValueError(f"--resume: no checkpoint-*/{STATE_FILE} in {output}")
    return found[-1]

