"""The `qwen3next` command line: real subprocesses on a tiny model directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tiny_models import make_model, write_byte_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    make_model("base", vocab_size=261).save_pretrained(d)
    write_byte_tokenizer(d)
    return d


def run(*args, input=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qwen3next.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, input=input)


def test_info_reports_counts_from_config(model_dir):
    from qwen3next.config import Qwen3NextConfig

    r = run("info", "--model", model_dir)
    assert r.returncode == 0, r.stderr
    counts = Qwen3NextConfig.from_pretrained(model_dir).parameter_counts()
    assert f"{counts['total']:,}" in r.stdout and f"{counts['active']:,}" in r.stdout
    assert "LLLA" in r.stdout


def test_info_plans_memory_in_the_engines_default_dtype(model_dir, tmp_path):
    """Without --dtype, info sizes the cache in float32 (what generate/chat/serve use by default), not in the
    checkpoint's torch_dtype, and says so; --dtype bfloat16 gives the bf16 sizes."""
    import json

    from qwen3next.config import Qwen3NextConfig
    from qwen3next.engine.memory import estimate_memory

    d = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "torch_dtype": "bfloat16"}))  # info reads config.json only
    config = Qwen3NextConfig.from_pretrained(tmp_path)
    r = run("info", "--model", tmp_path, "--context", "256")
    assert r.returncode == 0, r.stderr
    assert "dtype assumed" in r.stdout and "(float32 activations)" in r.stdout
    assert f"{estimate_memory(config, 256, 1, 4).cache_bytes:,} B" in r.stdout
    r = run("info", "--model", tmp_path, "--context", "256", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert f"{estimate_memory(config, 256, 1, 2).cache_bytes:,} B" in r.stdout


def test_info_sizes_prefix_cache_snapshots(model_dir):
    """info prints one snapshot's size (a DeltaNet state slot) and, with --context, the snapshot slots prefix caching
    adds by default: the cache row plus the snapshot row is a --max-memory that runs the whole batch at once with that
    many snapshot slots (one byte less: one slot fewer); the cache row alone still runs the batch, with none."""
    import re

    from qwen3next.config import Qwen3NextConfig
    from qwen3next.engine.llm import Engine
    from qwen3next.engine.memory import fmt_bytes

    state = Qwen3NextConfig.from_pretrained(model_dir).state_bytes_per_sequence(4, 4)
    r = run("info", "--model", model_dir, "--context", "256", "--batch", "2")
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^prefix-cache snapshot +{re.escape(fmt_bytes(state))} each  \(one DeltaNet state slot",
                     r.stdout, re.M), r.stdout
    row = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^  (\S.*?) +\S+ \S+ +([\d,]+) B ", r.stdout, re.M)}
    snapshots = row["prefix snapshots"] // state
    assert row["prefix snapshots"] == snapshots * state and snapshots >= 1
    budget = row["cache"] + row["prefix snapshots"]
    engine = Engine(model_dir, max_memory=budget, max_num_seqs=2, max_model_len=256)
    assert engine.enable_prefix_caching and engine.plan.num_snapshot_slots == snapshots
    assert engine.plan.num_full_length_seqs == 2
    for memory, slots in ((budget - 1, snapshots - 1), (row["cache"], 0)):
        plan = Engine(model_dir, max_memory=memory, max_num_seqs=2, max_model_len=256).plan
        assert plan.num_full_length_seqs == 2 and plan.num_snapshot_slots == slots


@pytest.mark.parametrize("flag,value", [("--batch", "4"), ("--prefill-chunk-size", "256")])
def test_info_plan_options_need_context(model_dir, flag, value):
    r = run("info", "--model", model_dir, flag, value)
    assert r.returncode == 1
    assert flag in r.stderr and "--context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("caching", [[], ["--no-enable-prefix-caching"], ["--kv-cache-dtype", "float16"]])
def test_generate_matches_the_plain_loop(model_dir, caching):
    import torch

    from qwen3next.checkpoint import load_model
    from qwen3next.model.generate import generate_tokens
    from qwen3next.tokenizer import Tokenizer

    r = run("generate", "--model", model_dir, "--prompt", "abc", "--max-tokens", "8", "--threads", "1", *caching)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    kv = caching[1] if caching[:1] == ["--kv-cache-dtype"] else None  # the plain loop on a cache of that dtype
    ids = list(generate_tokens(model, tok.encode("abc"), 8, stop_token_ids=tuple(tok.eos_token_ids), kv_cache_dtype=kv))
    ids = [t for t in ids if t not in tok.eos_token_ids]
    assert r.stdout == "abc" + tok.decode(ids, skip_special_tokens=True) + "\n"


def test_generate_batches_several_prompts(model_dir):
    r = run("generate", "--model", model_dir, "--prompt", "a", "--prompt", "bb", "--max-tokens", "4", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("=== ") == 2
    one = run("generate", "--model", model_dir, "--prompt", "a", "--prompt", "bb", "--max-tokens", "4", "--threads",
              "1", "--num-scheduler-steps", "1")  # one step per schedule: the same greedy text
    assert one.returncode == 0 and one.stdout == r.stdout


def test_generate_into_a_closed_pipe_stops_quietly(model_dir):
    """`qwen3next generate ... | head` once head has exited: the write fails with EPIPE; the command ends with the
    shell's SIGPIPE status and no traceback (neither from the print nor from the interpreter's flush at exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "qwen3next.cli", "generate", "--model", str(model_dir), "--prompt",
                          "a", "--max-tokens", "4", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    p.stdout.close()  # the reader is gone before anything is written
    _, err = p.communicate(timeout=300)
    assert p.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_chat_reset_and_exit(model_dir):
    r = run("chat", "--model", model_dir, "--max-tokens", "3", "--threads", "1", input="hi\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "history cleared" in r.stderr
    assert r.stdout.count("> ") >= 3


@pytest.mark.parametrize("args,needle", [
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "x", "--num-scheduler-steps", "0"], "--num-scheduler-steps"),
    (["generate", "--prompt", "x", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
    (["bench", "--workload", "--kv-cache-dtype", "float16"], "--kv-cache-dtype"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "--model"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(args, needle):
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_leaves_the_openmp_wait_policy_to_the_user(model_dir, monkeypatch, capsys):
    """No OMP_WAIT_POLICY=PASSIVE behind the user's back: torch's OpenMP workers (and the bench's llama-bench, which
    inherits the environment) sleeping after every parallel region made 2-thread decoding ~10x slower on a VM."""
    from qwen3next.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["info", "--model", str(model_dir)]) == 0
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["info", "--model", str(model_dir)]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()


def test_broken_model_dir_is_a_clean_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    r = run("info", "--model", tmp_path)
    assert r.returncode == 1
    assert "model_type" in r.stderr and "Traceback" not in r.stderr


def test_compile_and_quantize_options_reach_the_engine():
    """`--compile` / `--quantize` parse on generate, chat and serve (running them compiles; the engine-level compile
    path is tested in test_compiled_decode.py)."""
    import argparse

    from qwen3next.cli import build_parser
    from qwen3next.server.app import add_serve_args

    for command, extra in (("generate", ["--prompt", "x"]), ("chat", [])):
        args = build_parser(command).parse_args([command, *extra, "--compile", "--quantize", "int8"])
        assert args.compile is True and args.quantize == "int8"
        assert build_parser(command).parse_args([command, *extra]).compile is False
    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    args = serve.parse_args(["--compile", "--quantize", "int4"])
    assert args.compile is True and args.quantize == "int4"
    r = run("generate", "--prompt", "x", "--quantize", "int3")
    assert r.returncode == 2 and "--quantize" in r.stderr


def test_token_map_ranks_the_tokens_of_text_and_generate_drafts_with_it(model_dir, tmp_path):
    """`qwen3next token-map`: the most frequent tokens of the files (counted over all of them), the most frequent
    first; `generate` with that map as speculative_token_map prints what it prints without speculative decoding."""
    import json

    from qwen3next.tokenizer import Tokenizer

    (tmp_path / "a.txt").write_text("e" * 50 + "t" * 12 + "\n")
    (tmp_path / "b.txt").write_text("t" * 18 + "a" * 20 + "\n")
    out = tmp_path / "maps" / "map.json"
    r = run("token-map", tmp_path / "a.txt", tmp_path / "b.txt", "--model", model_dir, "--size", "3", "--output", out)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(model_dir)
    assert json.loads(out.read_text()) == [tok.encode(c)[0] for c in "eta"]  # 50, 30, 20 (and 2 newlines)
    assert "3 of 4 distinct tokens" in r.stdout and "98.04% of the 102 tokens" in r.stdout
    plain = run("generate", "--model", model_dir, "--prompt", "abc", "--max-tokens", "12", "--threads", "1")
    config = json.dumps({"method": "mtp", "num_speculative_tokens": 2, "speculative_token_map": str(out)})
    spec = run("generate", "--model", model_dir, "--prompt", "abc", "--max-tokens", "12", "--threads", "1",
               "--speculative-config", config)
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    bad = run("token-map", tmp_path / "missing.txt", "--model", model_dir, "--output", out)
    assert bad.returncode == 1 and "missing.txt: no such file" in bad.stderr
    no_tokenizer = run("token-map", tmp_path / "a.txt", "--model", tmp_path, "--output", out)
    assert no_tokenizer.returncode == 1 and f"model: {tmp_path} has no tokenizer.json" in no_tokenizer.stderr
