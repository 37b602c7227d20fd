"""`qwen3next bench --workload ...`: prefix caching on vs off at tiny sizes. What is checked is behaviour (the "on"
engines compute fewer prompt tokens and hit the cache where prompts share a prefix, and nothing is hit where they do
not), the report's fields and the command's option checks; never timings."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from qwen3next import DEFAULT_MODEL
from qwen3next.bench import measure, prefix
from qwen3next.bench.harness import add_bench_args, run_bench
from qwen3next.checkpoint import load_model
from qwen3next.cli import main
from qwen3next.tokenizer import Tokenizer
from qwen3next.train.presets import preset_config

TINY = ["--rounds", "1", "--turns", "3", "--history-tokens", "120", "--message-tokens", "24", "--decode-tokens", "4",
        "--requests", "3", "--system-tokens", "80", "--prompt-tokens", "48"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    return parser.parse_args(argv)


def _check_sharing(s: dict) -> None:
    """A workload whose prompts share prefixes: the "on" runs hit and compute less; "off" never looks up."""
    assert s["hits"] > 0 and 0 < s["hit_rate"] < 1
    assert s["computed_tokens_on"] < s["computed_tokens_off"] == s["prompt_tokens"]
    assert s["computed_tokens_on"] == s["prompt_tokens"] - s["hits"]  # one round
    assert s["off_queries"] == 0
    h = s["headline"]
    assert {"metric", "off_ms", "on_ms", "speedup", "speedup_rounds", "target", "meets_target"} <= set(h)
    assert h["off_ms"] > 0 and h["on_ms"] > 0 and len(h["speedup_rounds"]) == 1


def test_all_workloads_on_the_tiny_preset(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    assert main(["bench", "--preset", "tiny", "--threads", "1", "--workload", "all", *TINY, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr()
    p = report["prefix"]
    assert list(p["workloads"]) == list(prefix.WORKLOADS) and p["rounds"] == 1
    assert report["options"]["threads"] == 1 and report["model"]["vocab_size"] == 128
    assert p["engine"]["boundary_token_ids"] == [126]  # the token-id chat's <|im_end|>: turn-boundary snapshots

    mt = p["workloads"]["multi-turn"]
    _check_sharing(mt)
    turns = mt["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert turns[0]["computed_on"] == turns[0]["computed_off"] == turns[0]["prompt_tokens"]  # the cache starts empty
    for t in turns[1:]:
        assert t["computed_off"] == t["prompt_tokens"]
        # the earlier turns (prompt and the reply fed back) are cached: about one message + reply + template left
        assert t["computed_on"] <= 24 + 4 + prefix.TURN_OVERHEAD
        assert t["reply_tokens"] == 4  # EOS ignored for token-id chats
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + 24
    assert mt["headline"]["metric"] == "turn-3 TTFT"

    shared = p["workloads"]["shared-system-prompt"]
    _check_sharing(shared)
    assert shared["shared_tokens"] >= 80 and len(shared["prompt_lens"]) == 3
    # every request after the first resumes after the shared system prompt's <|im_end|> (the newline after it is
    # part of `shared_tokens` and is computed again)
    assert shared["hits"] >= 2 * (shared["shared_tokens"] - 1)

    miss = p["workloads"]["cache-miss"]
    assert miss["hits"] == 0 and miss["hit_rate"] == 0.0 and miss["queries"] == 3 * 48
    assert miss["computed_tokens_on"] == miss["computed_tokens_off"] == miss["prompt_tokens"] == 3 * 48
    assert miss["common_prefix_tokens"] <= 3  # <|im_start|> user \n
    assert miss["tokens_per_s_on"] > 0 and miss["tokens_per_s_off"] > 0 and miss["headline"]["ratio"] > 0
    for s in p["workloads"].values():
        assert s["identical"] and all(c["queries"] > 0 for c in s["counters_on"])

    for text in ("multi-turn:", "shared-system-prompt:", "cache-miss:", "turn-3 TTFT", "hit rate (on)",
                 "throughput on / off", "1 threads"):
        assert text in printed.out
    assert printed.err.count("round 1/1 off") == 3 and printed.err.count("round 1/1 on ") == 3


def test_engines_have_the_setting_they_claim():
    model = measure.random_weights(preset_config("tiny"), torch.float32, 0)
    chat = prefix.TokenChat(model.config.vocab_size)
    opts = prefix.PrefixOptions(snapshot_slots=5)
    off = prefix._make_engine(model, chat.tokenizer, False, opts)
    on = prefix._make_engine(model, chat.tokenizer, True, opts)
    assert not off.enable_prefix_caching and not off.block_manager.enable_prefix_caching
    assert off.plan.num_snapshot_slots == 0
    assert on.enable_prefix_caching and on.plan.num_snapshot_slots == 5


def test_token_chat_has_the_chat_structure():
    chat = prefix.TokenChat(128)
    assert chat.tokenizer.token_to_id("<|im_end|>") == 126 and chat.tokenizer.token_to_id("<|im_start|>") == 125
    ids = chat.render([{"role": "system", "content": [7, 8]}, {"role": "user", "content": [9]}])
    assert ids == [125, 1, 4, 7, 8, 126, 4, 125, 2, 4, 9, 126, 4, 125, 3, 4]
    content = chat.message(random.Random(0), 50)
    assert len(content) == 50 and all(5 <= t < 125 for t in content)  # never a special id


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="demo model not built")
def test_demo_model_uses_its_chat_template_and_tools():
    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    chat = prefix.TextChat(tokenizer)
    system, tools = chat.shared_system(random.Random(0), 450)
    assert tools and len(tools) >= 1 and system.startswith(prefix.SYSTEM_TEXT)
    text = tokenizer.apply_chat_template([{"role": "system", "content": system}], tools=tools,
                                         add_generation_prompt=False)
    assert '"name": "get_weather"' in text and 420 <= len(tokenizer.encode(text)) <= 450
    message = chat.message(random.Random(1), 60, "What do you make of this passage?")
    assert 50 <= len(tokenizer.encode(message)) <= 60 and message.endswith("passage?")

    opts = prefix.PrefixOptions(workloads=["multi-turn", "shared-system-prompt"], rounds=1, turns=2,
                                history_tokens=200, message_tokens=40, max_tokens=4, requests=2, system_tokens=450,
                                warmup_tokens=64)
    p = prefix.bench_prefix(opts, model, tokenizer)
    mt, shared = p["workloads"]["multi-turn"], p["workloads"]["shared-system-prompt"]
    _check_sharing(mt)
    _check_sharing(shared)
    assert mt["history_tokens"] <= 200 and mt["turns"][1]["computed_on"] <= 40 + 4 + prefix.TURN_OVERHEAD
    assert shared["tools"] >= 1 and shared["hits"] >= shared["shared_tokens"] - 1
    assert "chat template" in p["prompts"]


def test_history_is_cut_to_fit_the_context():
    chat = prefix.TokenChat(128)
    opts = prefix.PrefixOptions(turns=10, history_tokens=2048, message_tokens=20, max_tokens=4)
    plan = prefix.plan_multi_turn(chat, opts, 512, random.Random(0))
    assert plan.info["note"] and plan.info["history_tokens"] <= 512 - 10 * (20 + 4 + prefix.TURN_OVERHEAD)
    with pytest.raises(ValueError, match="exceed the model's context"):
        prefix.plan_multi_turn(chat, prefix.PrefixOptions(turns=30, message_tokens=20, max_tokens=4), 512,
                               random.Random(0))


def test_workload_option_checks():
    assert prefix.parse_workloads("multi-turn, cache-miss") == ["multi-turn", "cache-miss"]
    assert prefix.parse_workloads("all") == list(prefix.WORKLOADS)
    with pytest.raises(argparse.ArgumentTypeError):
        prefix.parse_workloads("multi-turn,nope")
    args = _parse(["--workload", "cache-miss", "--workload", "multi-turn,cache-miss", "--turns", "2"])
    opts = prefix.options_from_args(args)
    assert opts.workloads == ["cache-miss", "multi-turn"] and opts.turns == 2 and opts.requests == 16
    with pytest.raises(ValueError, match="go with --workload"):
        run_bench(_parse(["--preset", "tiny", "--turns", "2"]))
    with pytest.raises(ValueError, match="--compare, --repeat do not apply"):
        run_bench(_parse(["--workload", "all", "--compare", "transformers", "--repeat", "2"]))
    with pytest.raises(ValueError, match="separate modes"):
        run_bench(_parse(["--workload", "all", "--ablation", "attention"]))
