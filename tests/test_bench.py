"""The benchmark harness on the tiny preset: report structure, ratios, and the roofline's bytes-per-token count."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import sys

import pytest
import torch

from qwen3next import DEFAULT_MODEL
from qwen3next.bench import llamacpp
from qwen3next.bench.harness import (
    BenchOptions,
    add_bench_args,
    bench,
    decode_weight_bytes,
    decode_weight_bytes_of,
    format_report,
    run_bench,
)
from qwen3next.config import Qwen3NextConfig
from qwen3next.model.qwen3_next import Qwen3NextForCausalLM
from qwen3next.quant.quantize import quantize_model
from qwen3next.train.presets import preset_dict


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_run_bench_tiny_with_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--preset", "tiny", "--threads", "1", "--batch", "1", "2", "--prompt-len", "16",
                              "--decode-tokens", "4", "--prefill-lens", "16", "--repeat", "1",
                              "--compare", "transformers", "--bandwidth-mib", "8", "--json", str(out)])
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr()

    rows = {(r["impl"], r["kind"], r["batch"], r["tokens"]): r for r in report["measurements"]}
    expected = {("ours", "prefill", 1, 16), ("transformers", "prefill", 1, 16)}
    expected |= {(impl, "decode", b, 16) for impl in ("ours", "engine", "transformers") for b in (1, 2)}
    assert set(rows) == expected
    for (_, kind, batch, tokens), r in rows.items():
        assert len(r["seconds"]) == 1 and _positive(r["seconds"][0])
        assert _positive(r["ms"]) and _positive(r["tokens_per_s"])
        per_call = batch * tokens if kind == "prefill" else batch
        assert r["tokens_per_s"] == pytest.approx(per_call / r["seconds"][0])
        assert r["ms"] == pytest.approx(1e3 * r["seconds"][0])

    ratios = {(q["impl"], q["kind"], q["batch"]): q for q in report["ratios"]}
    assert set(ratios) == {("ours", "prefill", 1), ("ours", "decode", 1), ("ours", "decode", 2),
                           ("engine", "decode", 1), ("engine", "decode", 2)}
    for (impl, kind, batch), q in ratios.items():
        ours, theirs = rows[(impl, kind, batch, 16)], rows[("transformers", kind, batch, 16)]
        assert q["ratio"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"], rel=1e-12)

    bw, roof = report["bandwidth"], report["roofline"]
    assert _positive(bw["read_gb_s"]) and _positive(bw["copy_gb_s"])
    assert roof["ideal_tokens_per_s"] == pytest.approx(bw["read_gb_s"] * 1e9 / roof["weight_bytes_per_token"])
    for impl in ("ours", "engine", "transformers"):
        decode1 = rows[(impl, "decode", 1, 16)]["tokens_per_s"]
        assert roof[f"{impl}_pct"] == pytest.approx(100 * decode1 / roof["ideal_tokens_per_s"])
    assert report["machine"]["threads"] == 1 and report["model"]["dtype"] == "float32"

    table = printed.out
    assert "prefill" in table and "decode roofline" in table
    assert f"{ratios[('ours', 'decode', 2)]['ratio']:.2f}x" in table
    assert printed.err.count("[bench] decode ") == 6  # one progress line per decode measurement


def _touched_bytes(model: Qwen3NextForCausalLM) -> int:
    """Independent count from the parameter tensors: bytes a batch-1 decode token reads."""
    c = model.config
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("mtp."):
            continue  # not run in plain decoding
        if name == "model.embed_tokens.weight":
            total += size // p.shape[0]  # one row
        elif ".mlp.experts." in name:
            assert p.shape[0] == c.num_experts
            total += size // c.num_experts * c.num_experts_per_tok
        else:
            total += size
    return total


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("small", {}), ("demo", {"mlp_only_layers": [1, 6]})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_weight_bytes_match_parameter_tensors(name, overrides, dtype):
    config = Qwen3NextConfig.from_dict({**preset_dict(name), **overrides})
    with torch.device("meta"):  # shapes and dtypes only, no memory
        model = Qwen3NextForCausalLM(config).to(dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    assert decode_weight_bytes(config, elem) == _touched_bytes(model)


@pytest.mark.parametrize("name,overrides", [("tiny", {}), ("demo", {"mlp_only_layers": [1, 6]})])
def test_decode_weight_bytes_of_a_model(name, overrides):
    config = Qwen3NextConfig.from_dict({**preset_dict(name), **overrides})
    model = Qwen3NextForCausalLM(config)
    assert decode_weight_bytes_of(model) == decode_weight_bytes(config, 4)
    if name == "demo":  # int8: one byte per weight plus a bf16 scale per output row, embedding and norms kept
        float_bytes = decode_weight_bytes(config, 4)
        int8_bytes = decode_weight_bytes_of(quantize_model(model, 8))
        assert 0.25 * float_bytes < int8_bytes < 0.35 * float_bytes


def test_bench_quantized_variants_report_speed_roofline_and_drift():
    # The shipped trained model: on random weights the logits are nearly flat and top-1 agreement means little.
    report = bench(BenchOptions(model=str(DEFAULT_MODEL), threads=1, batches=[1, 2], prompt_len=8, decode_tokens=2,
                                prefill_lens=[8], repeat=1, bandwidth_mib=8, quantize=["int8", "int4", "int4-mix"]))
    assert report["drift_prompts"] == "text"
    rows = {(r["impl"], r["batch"]) for r in report["measurements"] if r["kind"] == "decode"}
    assert {("ours-int8", 1), ("ours-int8", 2), ("ours-int4", 1), ("ours-int4", 2)} <= rows
    floats = {r["batch"]: r for r in report["measurements"] if r["impl"] == "ours" and r["kind"] == "decode"}
    for name, bits in (("int8", 8), ("int4", 4), ("int4-mix", 4)):
        q = report["quantized"][name]
        assert q["bits"] == bits
        assert q["weight_bytes_per_token"] < report["roofline"]["weight_bytes_per_token"] / 2
        d = q["drift"]
        assert d["positions"] > 100 and (0.97 if bits == 8 else 0.9) < d["top1_agreement"] <= 1.0
        assert 0 < d["mean_abs"] <= d["max_abs"] < d["ref_max_abs"]
        for r in q["decode"]:
            assert r["vs_float"] == pytest.approx(r["tokens_per_s"] / floats[r["batch"]]["tokens_per_s"])
    # int4 rounds far more coarsely than int8; the mixed recipe (coded groups of 32 and 16) holds finer groups
    assert report["quantized"]["int4"]["drift"]["mean_abs"] > report["quantized"]["int8"]["drift"]["mean_abs"]
    assert report["quantized"]["int4-mix"]["scale_format"] == "coded8"
    with pytest.raises(ValueError, match="quantize"):
        bench(BenchOptions(preset="tiny", threads=1, quantize=["int2"]))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bench(BenchOptions(preset="tiny", threads=1, prefill_lens=[10_000], bandwidth_mib=8))
    with pytest.raises(ValueError, match="repeat"):
        bench(BenchOptions(preset="tiny", threads=1, repeat=0))
    with pytest.raises(ValueError, match="compare"):
        bench(BenchOptions(preset="tiny", threads=1, compare="vllm"))


@torch.no_grad()
def test_timed_prefill_and_decode_compute_the_model():
    """The timed prefill (last-token logits only) and the cached steps after it give the full forward's logits."""
    from qwen3next.bench.harness import random_model
    from qwen3next.bench.measure import _prefill_last_logits, random_prompts

    model = random_model("tiny", torch.float32, seed=3)
    ids = random_prompts(model.config.vocab_size, 2, 9, seed=4)
    cache = model.new_cache(2, 12)
    last = _prefill_last_logits(model, ids, cache)
    torch.testing.assert_close(last, model(ids)[:, -1], rtol=1e-5, atol=1e-5)
    nxt = last.argmax(-1, keepdim=True)  # [B, 1]
    step = model(nxt, cache)[:, -1]
    torch.testing.assert_close(step, model(torch.cat([ids, nxt], 1))[:, -1], rtol=1e-5, atol=1e-5)


# ---- --compare llama.cpp ---------------------------------------------------------------------------------------------
# Two result lines recorded from the real llama-bench (llama.cpp sdist 0.3.36, demo model, f32 GGUF, 1 thread):
# `-p 0 -n 16 -d 128 -r 2 -o jsonl` (decode after a 128-token context), then `-p 128 -n 0 -r 2 -o jsonl` (prefill).
RECORDED_JSONL = (
    '{"build_commit": "sdist-0.3.36", "build_number": 0, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU", '
    '"model_filename": "gguf/demo-f32.gguf", "model_type": "qwen3next ?B all F32", "model_size": 76622016, '
    '"model_n_params": 19155504, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1, "cpu_mask": "0x0", '
    '"cpu_strict": false, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": -1, "n_cpu_moe": 0, '
    '"split_mode": "layer", "main_gpu": 0, "no_kv_offload": false, "flash_attn": -1, "devices": "auto", '
    '"tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto", '
    '"embeddings": false, "no_op_offload": 0, "no_host": false, "repack": true, "fit_target": 0, "fit_min_ctx": 0, '
    '"n_prompt": 0, "n_gen": 16, "n_depth": 128, "test_time": "2026-12-02T07:07:02Z", "avg_ns": 33523501, '
    '"stddev_ns": 2279661, "avg_ts": 478.383203, "stddev_ts": 32.530961, "samples_ns": [ 35135465, 31911537 ],'
    '"samples_ts": [ 455.38, 501.386 ]}\n'
    '{"build_commit": "sdist-0.3.36", "build_number": 0, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU", '
    '"model_filename": "gguf/demo-f32.gguf", "model_type": "qwen3next ?B all F32", "model_size": 76622016, '
    '"model_n_params": 19155504, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1, "cpu_mask": "0x0", '
    '"cpu_strict": false, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": -1, "n_cpu_moe": 0, '
    '"split_mode": "layer", "main_gpu": 0, "no_kv_offload": false, "flash_attn": -1, "devices": "auto", '
    '"tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto", '
    '"embeddings": false, "no_op_offload": 0, "no_host": false, "repack": true, "fit_target": 0, "fit_min_ctx": 0, '
    '"n_prompt": 128, "n_gen": 0, "n_depth": 0, "test_time": "2026-12-02T07:07:03Z", "avg_ns": 50798318, '
    '"stddev_ns": 817429, "avg_ts": 2520.094748, "stddev_ts": 40.552524, "samples_ns": [ 50220308, 51376328 ],'
    '"samples_ts": [ 2548.77, 2491.42 ]}\n'
)


def test_parse_recorded_llama_bench_jsonl():
    results = llamacpp.parse_jsonl("llama_model_loader: a log line on stdout\n" + RECORDED_JSONL)
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in results] == [(0, 16, 128), (128, 0, 0)]
    tg, pp = results
    assert tg["samples_ts"] == [455.38, 501.386] and tg["avg_ts"] == pytest.approx(478.383203)
    assert llamacpp.tokens_per_s(tg) == pytest.approx((455.38 + 501.386) / 2)  # median of the reps
    assert llamacpp.tokens_per_s(pp) == pytest.approx((2548.77 + 2491.42) / 2)
    assert pp["model_size"] == 76622016 and pp["build_commit"] == "sdist-0.3.36" and pp["n_threads"] == 1
    assert "cpu_mask" not in pp  # reduced to the fields the bench uses
    with pytest.raises(llamacpp.LlamaBenchError, match="avg_ts"):
        llamacpp.parse_jsonl('{"n_prompt": 0, "n_gen": 4, "n_depth": 0, "stddev_ts": 1, "samples_ts": [1]}')


def test_llama_bench_command_lines():
    peer = llamacpp.LlamaBench("/opt/llama-bench", threads=3)
    assert peer.command("m.gguf", gen=16, depth=512) == [
        "/opt/llama-bench", "-m", "m.gguf", "-t", "3", "-p", "0", "-n", "16", "-d", "512", "-r", "1", "-o", "jsonl"]
    assert peer.command("m.gguf", prompt=[128, 4096])[5:12] == ["-p", "128,4096", "-n", "0", "-d", "0", "-r"]


def test_pair_rounds_pairs_round_r_with_round_r():
    # round 3: ours failed; round 4: llama.cpp failed -> those rounds give no ratio, the medians use what ran
    got = llamacpp.pair_rounds([100.0, 90.0, None, 120.0], [200.0, 100.0, 50.0, None])
    assert got["ratios"] == [0.5, 0.9]
    assert got["ratio_min"] == 0.5 and got["ratio_median"] == pytest.approx(0.7)
    assert got["ours_tokens_per_s"] == 100.0 and got["llama_cpp_tokens_per_s"] == 100.0
    # the pairing is by round, not by sorted values: ours' fastest round against llama.cpp's slowest
    got = llamacpp.pair_rounds([300.0, 100.0, 200.0], [100.0, 300.0, 200.0])
    assert got["ratios"] == [3.0, 1 / 3, 1.0] and got["ratio_min"] == 1 / 3 and got["ratio_median"] == 1.0
    assert got["ours_tokens_per_s"] == got["llama_cpp_tokens_per_s"] == 200.0
    empty = llamacpp.pair_rounds([None], [1.0])
    assert empty["ratios"] == [] and empty["ratio_min"] is None and empty["ours_tokens_per_s"] is None
    with pytest.raises(ValueError, match="rounds"):
        llamacpp.pair_rounds([1.0], [1.0, 2.0])


def _write_gguf(path, meta: dict, tensors: list[tuple[str, tuple[int, ...], int]]) -> None:
    """A minimal GGUF v3: `meta` {key: int (u32) | str | list[str] | list[int] (u32)}, tensors (name, ggml shape,
    ggml type F32=0 / Q8_0=8) with zero data, 32-byte aligned."""
    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    def value(v) -> bytes:
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        if isinstance(v, int):
            return struct.pack("<I", 4) + struct.pack("<I", v)
        if all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(string(x) for x in v)
        return struct.pack("<IIQ", 9, 4, len(v)) + b"".join(struct.pack("<I", x) for x in v)

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    head += b"".join(string(k) + value(v) for k, v in meta.items())
    data, offset = b"", 0
    for name, shape, ggml_type in tensors:
        numel = math.prod(shape)
        nbytes = numel * 4 if ggml_type == 0 else numel // 32 * 34
        head += string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        head += struct.pack("<IQ", ggml_type, offset)
        data += bytes(nbytes) + bytes(-nbytes % 32)
        offset = len(data)
    path.write_bytes(head + bytes(-len(head) % 32) + data)


def _tiny_gguf(path, file_type: int = 0, hidden: int = 32, vocab: int = 128) -> None:
    """A qwen3next-shaped GGUF: 4 layers + 1 MTP layer, 4 experts top-2 (what the `tiny` preset would convert to,
    in miniature: a few tensors per kind)."""
    meta = {"general.architecture": "qwen3next", "general.file_type": file_type,
            "qwen3next.block_count": 5, "qwen3next.nextn_predict_layers": 1, "qwen3next.embedding_length": hidden,
            "qwen3next.expert_count": 4, "qwen3next.expert_used_count": 2,
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)], "tokenizer.ggml.token_type": [1] * vocab}
    t = 8 if file_type == 7 else 0
    _write_gguf(path, meta, [("token_embd.weight", (hidden, vocab), t), ("output.weight", (hidden, vocab), t),
                             ("output_norm.weight", (hidden,), 0), ("blk.0.ffn_up_exps.weight", (hidden, 64, 4), t),
                             ("blk.0.ssm_a", (3,), 0), ("blk.4.nextn.eh_proj.weight", (2 * hidden, hidden), t)])


@pytest.mark.parametrize("file_type,elem", [(0, 4.0), (7, 34 / 32)])
def test_gguf_header_weight_bytes_per_decode_token(tmp_path, file_type, elem):
    path = tmp_path / "m.gguf"
    _tiny_gguf(path, file_type)
    meta, tensors = llamacpp.read_gguf(path)
    assert meta["general.architecture"] == "qwen3next" and meta["qwen3next.expert_used_count"] == 2
    assert meta["tokenizer.ggml.tokens"][:2] == ["t0", "t1"] and meta["tokenizer.ggml.token_type"] is None
    sizes = {t.name: t.nbytes for t in tensors}
    assert sizes["token_embd.weight"] == 32 * 128 * elem and sizes["blk.0.ssm_a"] == 12
    assert llamacpp.gguf_format(path) == ("F32" if file_type == 0 else "Q8_0")
    got = llamacpp.gguf_decode_weight_bytes(path)
    # one embedding row + full lm_head + norm + 2 of 4 experts + ssm_a; the MTP layer (blk.4) not at all
    assert got["weight_bytes_per_token"] == 32 * elem + 32 * 128 * elem + 128 + 32 * 64 * 2 * elem + 12
    assert got["tensor_bytes"] == sum(sizes.values()) and got["file_bytes"] == path.stat().st_size
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="unreadable GGUF header"):
        llamacpp.read_gguf(tmp_path / "bad.gguf")


FAKE_LLAMA_BENCH = """#!{python}
# A stand-in for llama-bench: one result line per requested test, fixed speeds; records its arguments and threads.
import json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(os.path.join(os.path.dirname(sys.argv[0]), "calls.txt"), "a") as f:
    f.write(os.environ.get("OMP_NUM_THREADS", "-") + " " + " ".join(sys.argv[1:]) + "\\n")
if "fail" in args["-m"]:
    sys.exit("main: error: failed to load model")
for p in args["-p"].split(","):
    tests = [(int(p), 0, 0, 1000.0)] if p != "0" else [(0, int(args["-n"]), int(args["-d"]), 50.0)]
    for n_prompt, n_gen, n_depth, ts in tests:
        print(json.dumps({{"build_commit": "fake", "model_type": "fake", "model_size": 1, "n_threads": 1,
                          "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth, "avg_ts": ts, "stddev_ts": 0.0,
                          "samples_ts": [ts] * int(args["-r"])}}))
"""


@pytest.fixture
def fake_llama_bench(tmp_path):
    path = tmp_path / "bin" / "llama-bench"
    path.parent.mkdir()
    path.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_llama_bench_subprocess_results_and_failures(tmp_path, fake_llama_bench):
    peer = llamacpp.LlamaBench(str(fake_llama_bench), threads=2, timeout_s=60)
    assert llamacpp.tokens_per_s(peer.decode("m.gguf", context=64, tokens=8)) == 50.0
    assert {n: llamacpp.tokens_per_s(r) for n, r in peer.prefill("m.gguf", [16, 32]).items()} == {16: 1000.0,
                                                                                                   32: 1000.0}
    calls = (fake_llama_bench.parent / "calls.txt").read_text().splitlines()
    assert calls[0] == "2 -m m.gguf -t 2 -p 0 -n 8 -d 64 -r 1 -o jsonl"  # OMP_NUM_THREADS = -t
    with pytest.raises(llamacpp.LlamaBenchError, match="status 1: main: error: failed to load model"):
        peer.decode("fail.gguf", context=64, tokens=8)
    slow = tmp_path / "slow-bench"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    with pytest.raises(llamacpp.LlamaBenchError, match="timed out"):
        llamacpp.LlamaBench(str(slow), threads=1, timeout_s=0.2).decode("m.gguf", 8, 8)


def _parse_bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    return parser.parse_args(argv)


def test_llama_cpp_option_errors(tmp_path, fake_llama_bench, capsys):
    from qwen3next.cli import main

    f32 = tmp_path / "m-f32.gguf"
    _tiny_gguf(f32)
    model, bench_bin = str(DEFAULT_MODEL), str(fake_llama_bench)
    ok = ["--compare", "llama.cpp", "--llama-bench", bench_bin, "--model", model]
    cases = [
        (["--compare", "llama.cpp", "--llama-bench", str(tmp_path / "nope"), "--gguf", f"F32={f32}",
          "--model", model], "llama_bench: .*nope is not an executable llama-bench \\(no such file\\)"),
        ([*ok, "--gguf", f"F32={tmp_path / 'missing.gguf'}"], "gguf: F32=.*missing.gguf: no such file"),
        ([*ok, "--gguf", f"F16={f32}"], "gguf: unknown format 'F16'"),
        ([*ok, "--gguf", f"Q8_0={f32}"], "gguf: Q8_0=.* holds F32 weights"),
        ([*ok, "--gguf", str(f32)], "gguf: expected FORMAT=PATH"),
        ([*ok, "--gguf", f"F32={f32}", f"f32={f32}"], "gguf: format F32 given twice"),
        ([*ok, "--gguf", f"F32={f32}", "--dtype", "bfloat16"], "gguf: F32 is measured against our float32"),
        (ok, "gguf: --compare llama.cpp needs --gguf"),
        (["--llama-bench", bench_bin, "--gguf", f"F32={f32}", "--model", model], "gguf: --gguf needs --compare"),
        (["--compare", "llama.cpp", "--llama-bench", bench_bin, "--gguf", f"F32={f32}"],
         "compare: llama.cpp needs --model"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            run_bench(_parse_bench_args(argv))
    # through the real CLI: a one-line error and exit status 1, no traceback
    assert main(["bench", "--compare", "llama.cpp", "--gguf", f"F32={f32}"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "qwen3next bench: error: compare: llama.cpp needs --model, the HF directory its GGUF " \
                          "files were converted from (a random --preset model has no GGUF twin)"
    not_executable = tmp_path / "llama-bench-not-executable"
    not_executable.write_text("")
    with pytest.raises(ValueError, match="llama_bench: .* \\(not executable\\)"):
        BenchOptions(model=model, compare="llama.cpp", llama_bench=str(not_executable),
                     gguf={"F32": str(f32)}).validate()
    with pytest.raises(ValueError, match="llama_bench: --llama-bench needs --compare llama.cpp"):
        BenchOptions(llama_bench=bench_bin).validate()
    with pytest.raises(ValueError, match="compare: expected one of"):
        BenchOptions(compare="vllm").validate()
    # a GGUF converted from another model (hidden size / vocab differ) is refused once the model is loaded
    with pytest.raises(ValueError, match="was not converted from --model"):
        bench(BenchOptions(model=model, compare="llama.cpp", llama_bench=bench_bin, gguf={"F32": str(f32)},
                           threads=1, prefill_lens=[8], prompt_len=8, bandwidth_mib=8))


def test_gguf_formats_add_their_variants():
    opts = BenchOptions(quantize=["int8"], gguf={"F32": "a", "Q4_K_M": "b", "Q8_0": "c", "BF16": "d"})
    assert opts.variants() == ["int8", "int4", "bf16"]
    assert BenchOptions(quantize=["int4"]).variants() == ["int4"]


def test_bench_against_a_fake_llama_bench(tmp_path, fake_llama_bench, capsys):
    """The whole --compare llama.cpp path on the tiny preset, with a stand-in llama-bench of fixed speed: paired rounds,
    ratios, roofline shares, the table; a failing llama-bench run is an error row, not a crash."""
    from qwen3next.bench.harness import random_model
    from qwen3next.checkpoint import save_model

    model_dir = tmp_path / "tiny"
    save_model(random_model("tiny", torch.float32, 0), model_dir)
    f32, q8 = tmp_path / "tiny-f32.gguf", tmp_path / "tiny-fail-Q8_0.gguf"  # "fail": the fake exits with status 1
    _tiny_gguf(f32)
    _tiny_gguf(q8, file_type=7)
    out = tmp_path / "bench.json"
    args = _parse_bench_args(["--model", str(model_dir), "--threads", "1", "--batch", "1", "--prompt-len", "16",
                              "--decode-tokens", "4", "--prefill-lens", "16", "32", "--repeat", "2",
                              "--bandwidth-mib", "8", "--compare", "llama.cpp", "--llama-bench", str(fake_llama_bench),
                              "--gguf", f"F32={f32}", f"Q8_0={q8}", "--json", str(out)])
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr()
    lc = report["llama_cpp"]
    assert lc["threads"] == 1 and lc["rounds"] == 2 and set(lc["formats"]) == {"F32", "Q8_0"}
    assert set(report["quantized"]) == {"int8"}  # added for Q8_0

    f = lc["formats"]["F32"]
    assert f["ours"] == "float32" and f["errors"] == [] and f["build_commit"] == "fake"
    assert f["ours_weight_bytes_per_token"] == report["roofline"]["weight_bytes_per_token"]
    decode, *prefill = f["rows"]
    assert (decode["phase"], decode["tokens"], decode["context"]) == ("decode", 4, 16)
    assert [(r["phase"], r["tokens"]) for r in prefill] == [("prefill", 16), ("prefill", 32)]
    for row, peer in ((decode, 50.0), *((r, 1000.0) for r in prefill)):
        assert row["llama_cpp"]["rounds"] == [peer, peer] and "compiled" not in row
        ours = row["eager"]
        assert len(ours["rounds"]) == 2 and all(_positive(x) for x in ours["rounds"])
        assert ours["ratios"] == pytest.approx([x / peer for x in ours["rounds"]])
        assert ours["ratio_min"] == pytest.approx(min(ours["ratios"]))
        assert ours["ratio_median"] == pytest.approx(statistics.median(ours["ratios"]))
        assert ours["tokens_per_s"] == pytest.approx(statistics.median(ours["rounds"]))
    read = report["bandwidth"]["read_gb_s"] * 1e9
    assert decode["llama_cpp"]["roofline_pct"] == pytest.approx(100 * 50.0 * f["weight_bytes_per_token"] / read)
    assert decode["eager"]["roofline_pct"] == pytest.approx(
        100 * decode["eager"]["tokens_per_s"] * f["ours_weight_bytes_per_token"] / read)
    assert "roofline_pct" not in prefill[0]["eager"]

    q = lc["formats"]["Q8_0"]  # every llama-bench run failed: reported, ours still measured, no ratio
    assert q["ours"] == "int8" and [e.split(":")[0] for e in q["errors"]] == ["decode", "prefill"]
    assert q["rows"][0]["llama_cpp"]["rounds"] == [None, None] and q["rows"][0]["eager"]["ratio_min"] is None
    assert _positive(q["rows"][0]["eager"]["tokens_per_s"])
    calls = (fake_llama_bench.parent / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 * 2 + 2  # F32: decode + prefill per round; Q8_0: both fail in round 1, round 2 skips

    table = printed.out
    assert "llama.cpp vs ours" in table and "F32 = float32" in table and "Q8_0 = int8" in table
    assert f"{decode['eager']['ratio_min']:.2f}x / {decode['eager']['ratio_median']:.2f}x" in table
    assert "error: decode: llama-bench exited with status 1" in table
    assert printed.err.count("[bench] llama.cpp F32 round ") == 2


def test_a_variant_that_cannot_be_built_is_reported(monkeypatch, capsys):
    import qwen3next.quant.quantize as quantize

    def refuse(model, bits, **kw):
        raise ValueError(f"bits: expected 8 or 4, got {bits}")

    monkeypatch.setattr(quantize, "quantize_model", refuse)
    report = bench(BenchOptions(preset="tiny", threads=1, batches=[1], prompt_len=8, decode_tokens=2,
                                prefill_lens=[8], repeat=1, bandwidth_mib=8, quantize=["bf16"]))
    assert report["quantized"]["bf16"] == {"error": "bits: expected 8 or 4, got 16", "bits": 16}
    assert "bf16 weights: not measured (bits: expected 8 or 4, got 16)" in format_report(report)


@pytest.mark.skipif(not (os.environ.get("QWEN3NEXT_LLAMA_BENCH") and os.environ.get("QWEN3NEXT_TEST_GGUF")),
                    reason="set QWEN3NEXT_LLAMA_BENCH (a llama-bench binary) and QWEN3NEXT_TEST_GGUF (a GGUF of the "
                           "demo model) to run against the real llama.cpp")
def test_bench_against_real_llama_cpp(tmp_path):
    binary, gguf = os.environ["QWEN3NEXT_LLAMA_BENCH"], os.environ["QWEN3NEXT_TEST_GGUF"]
    fmt = llamacpp.gguf_format(gguf)
    assert fmt is not None, f"{gguf}: not one of {list(llamacpp.GGUF_VARIANTS)}"
    out = tmp_path / "bench.json"
    args = _parse_bench_args(["--model", str(DEFAULT_MODEL), "--threads", "1", "--batch", "1", "--prompt-len", "32",
                              "--decode-tokens", "4", "--prefill-lens", "32", "--repeat", "2", "--bandwidth-mib", "8",
                              "--compare", "llama.cpp", "--llama-bench", binary, "--gguf", f"{fmt}={gguf}",
                              "--json", str(out)])
    assert run_bench(args) == 0
    f = json.loads(out.read_text())["llama_cpp"]["formats"][fmt]
    assert f["errors"] == [] and f["model_type"].startswith("qwen3next")
    assert f["gguf_tensor_bytes"] == f["model_size"]  # our GGUF header reading agrees with llama.cpp's
    if fmt == "F32":  # same tensors, same counting rule
        assert f["weight_bytes_per_token"] == f["ours_weight_bytes_per_token"]
    for row in f["rows"]:
        assert all(_positive(x) for x in row["llama_cpp"]["rounds"]) and len(row["eager"]["ratios"]) == 2
        assert row["eager"]["ratio_min"] <= row["eager"]["ratio_median"]


# ---- --speculative-config: plain vs MTP speculative decoding ---------------------------------------------------------
SPEC_K2 = {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False}


def test_bench_speculative_section_on_the_tiny_preset():
    """Paired plain / speculative rounds per batch size: speeds, speedups, acceptance, and greedy outputs identical
    (fixed draft length, so every timed step verifies drafts even though a random MTP head rarely guesses right)."""
    report = bench(BenchOptions(preset="tiny", threads=1, batches=[1, 2], prompt_len=12, decode_tokens=6,
                                prefill_lens=[8], repeat=1, bandwidth_mib=8, speculative_config=SPEC_K2))
    sp = report["speculative"]
    full = {**SPEC_K2, "draft_head": None, "speculative_token_map": None}  # the parsed config, its defaults included
    assert sp["config"] == full and report["options"]["speculative_config"] == full
    assert sp["prompts"] == "random" and sp["prompt_lens"] == [12, 12] and "random" in sp["prompt_description"]
    assert sp["decode_tokens"] == 6 and sp["rounds"] == 1 and sp["identical"] is True and sp["weights"] == "float32"
    assert [(r["mode"], r["batch"]) for r in sp["rows"]] == [("eager", 1), ("eager", 2)]
    for r in sp["rows"]:
        assert r["identical"] is True and r["mismatches"] == []
        assert len(r["plain_rounds"]) == len(r["spec_rounds"]) == len(r["speedups"]) == 1
        assert all(_positive(x) for x in (*r["plain_rounds"], *r["spec_rounds"]))
        assert r["speedups"][0] == pytest.approx(r["spec_rounds"][0] / r["plain_rounds"][0])
        assert r["speedup_median"] == r["speedup_min"] == r["speedups"][0]
        assert r["plain_tokens_per_s"] == r["plain_rounds"][0] and r["spec_tokens_per_s"] == r["spec_rounds"][0]
        # 5 decode tokens per request after the prefill's first, each of the 2 prompts once per round (batch 1: two
        # groups): every spec step verifies k = 2 drafts
        groups = 2 // r["batch"]
        assert r["plain_steps"] == 5 * groups and 2 * groups <= r["spec_steps"] <= 5 * groups
        assert r["draft_length_last"] == 2
        # (the last step of a group drafts fewer when fewer tokens are left to generate)
        assert r["batch"] * (r["spec_steps"] - groups) <= r["verifications"] <= r["batch"] * r["spec_steps"]
        assert r["verifications"] < r["draft_tokens"] <= 2 * r["verifications"]
        assert 0 <= r["acceptance_rate"] <= 1 and r["acceptance_rate"] == r["accepted_tokens"] / r["draft_tokens"]
        assert r["mean_accepted_length"] == pytest.approx(1 + r["accepted_tokens"] / r["verifications"])
        first, second = r["acceptance_by_position"]
        assert 0 <= first <= 1 and (second is None or 0 <= second <= 1)
    text = format_report(report)
    assert "speculative decoding (mtp, num_speculative_tokens 2, fixed draft length 2)" in text
    for r in sp["rows"]:
        assert f"{r['speedup_median']:.2f}x / {r['speedup_min']:.2f}x" in text
    assert "random token-id prompts" in text and "BUG" not in text
    json.dumps(report)  # JSON-ready


def test_speculative_section_measures_the_engines_weight_storage(tmp_path):
    """A bf16 checkpoint directory: the engines of the speculative section run the bf16-stored weights the engine
    itself would load (a copy; the bench's float model is untouched); an fp32 directory: the float model itself."""
    from types import SimpleNamespace

    from qwen3next import kernels
    from qwen3next.bench.speculative import engine_storage
    from qwen3next.checkpoint import load_model
    from tiny_models import make_model

    if not kernels.available():
        pytest.skip("bf16 storage is the default only where the native kernels run")
    for dtype in (torch.bfloat16, torch.float32):
        d = tmp_path / str(dtype)
        make_model("base", vocab_size=300).to(dtype).save_pretrained(d)
        model = load_model(d, dtype=torch.float32)
        got, weights = engine_storage(SimpleNamespace(model=str(d)), model)
        if dtype == torch.float32:
            assert got is model and weights == "float32"
            continue
        assert got is not model and weights.startswith("bf16 storage")
        assert got.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
        assert got.model.embed_tokens.weight is model.model.embed_tokens.weight  # not a matrix: shared
        assert torch.equal(got.lm_head.weight.float(), model.lm_head.weight)  # a bf16 checkpoint: the same values
    model = make_model("base", vocab_size=300)
    assert engine_storage(SimpleNamespace(model=None), model) == (model, "float32")


def test_speculative_prompts_from_text():
    """With a tokenizer: Pride and Prejudice passages alternating with held-out synthetic chats, cycled for a batch."""
    from qwen3next.bench import speculative
    from qwen3next.tokenizer import Tokenizer

    passages = speculative.austen_passages()
    assert len(passages) == 8 and all(40 <= len(p.split()) <= 120 for p in passages)
    assert passages[0].startswith("It is a truth universally acknowledged")
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    ps = speculative.prompt_set(tok, 8256, 4, 16, 0)
    assert ps.source == "text" and len(ps.prompts) == 16 and "Pride and Prejudice" in ps.description
    assert tok.decode(ps.prompts[0]).startswith("It is a truth")
    chats = [tok.decode(p) for p in ps.prompts[1::2]]
    assert all(c.startswith("<|im_start|>") and c.endswith("<|im_start|>user\n" + c.split("<|im_start|>user\n")[-1])
               for c in chats)
    assert all(c.endswith("<|im_end|>\n<|im_start|>assistant\n") for c in chats)
    assert any("<tools>" in c for c in chats) and any("<tools>" not in c for c in chats)
    assert ps.batch(3) == ps.prompts[:3] and ps.batch(18) == ps.prompts + ps.prompts[:2]


def test_speculative_config_errors(tmp_path, capsys):
    from qwen3next.cli import main
    from tiny_models import make_model, write_byte_tokenizer

    for value, needle in (('{"method": "x"}', "method must be one of"),
                          ('{"method": "mtp", "draft": 2}', "unknown key 'draft'")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--speculative-config", value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--speculative-config" in err and needle in err and "Traceback" not in err
    # a model without an MTP head: the engine's error, before any measurement runs
    no_mtp = tmp_path / "no-mtp"
    make_model("base", vocab_size=261, mtp=False).save_pretrained(no_mtp)
    write_byte_tokenizer(no_mtp)
    assert main(["bench", "--model", str(no_mtp), "--threads", "1", "--prompt-len", "16", "--prefill-lens", "16",
                 "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']) == 1
    err = capsys.readouterr().err
    assert "qwen3next bench: error: speculative_config: method 'mtp' needs the model's MTP head" in err
    assert "bandwidth" not in err and "Traceback" not in err


def test_the_report_names_the_memory_allocator_in_use():
    """`memory_allocator` reads the process's mappings: this process runs on the system malloc, a child started with
    tcmalloc preloaded (when the machine has it) reports tcmalloc."""
    import glob
    import subprocess

    from qwen3next.bench.harness import memory_allocator

    assert memory_allocator() == "system"
    libs = glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/libtcmalloc_minimal.so.4")
    if not libs:
        pytest.skip("tcmalloc is not installed here")
    code = "from qwen3next.bench.harness import memory_allocator; print(memory_allocator())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LD_PRELOAD": libs[0]})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tcmalloc"
