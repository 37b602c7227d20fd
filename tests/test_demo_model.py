"""The embedded demo model: complete HF directory, loads in transformers with the same logits, generates text."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3next.checkpoint import load_model
from qwen3next.engine.llm import DEFAULT_MODEL, Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.tokenizer import Tokenizer
from qwen3next.tool_calls import parse_tool_calls

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(DEFAULT_MODEL)


def test_directory_is_complete():
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "README.md"):
        assert (DEFAULT_MODEL / f).is_file(), f
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 45e6, size
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config["num_nextn_predict_layers"] == 1


def test_architecture_is_the_full_qwen3_next_pattern(model):
    c = model.config
    assert c.layer_types.count("linear_attention") == 3 * c.layer_types.count("full_attention")
    assert all(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert c.shared_expert_intermediate_size > 0 and model.mtp is not None


def test_transformers_gives_the_same_logits(model, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged, that a single man")])
    with torch.no_grad():
        err = (model(ids) - hf(input_ids=ids, use_cache=False).logits).abs().max().item()
    assert err < 1e-3, err


def test_tokenizer_is_the_truncated_qwen_bpe(tokenizer):
    assert tokenizer.encode(", world!") == [11, 1879, 0]  # Qwen3's own ids (all < 8192 survive the truncation)
    assert max(tokenizer.encode("Hello, world! 你好")) < 8192  # "Hello" (9707 in Qwen3) falls back to smaller parts
    assert tokenizer.token_to_id("<|im_start|>") == 8193 and tokenizer.token_to_id("<|im_end|>") == 8194


def test_generates_prose_and_a_tool_call(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, max_memory="256MiB", max_model_len=1024)
    prose = engine.add_request("It is a truth universally acknowledged, that",
                               SamplingParams(temperature=0, max_tokens=30))
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic "
              "expression with integers, + - * / and parentheses.", "parameters": {"type": "object", "properties": {
                  "expression": {"type": "string", "description": "The expression, e.g. 12*7"}},
                  "required": ["expression"]}}}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 345 * 12?"}], tools=tools)
    call = engine.add_request(tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=40))
    while engine.step():
        pass
    text = prose.output().text
    assert len(text.split()) >= 5 and "\ufffd" not in text
    _, calls = parse_tool_calls(call.output().text)
    assert calls and calls[0]["name"] == "calculator", call.output().text
