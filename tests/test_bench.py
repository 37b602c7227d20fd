"""The benchmark harness on the tiny preset: report structure, ratios, and the roofline's bytes-per-token count."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from qwen3next import DEFAULT_MODEL
from qwen3next.bench.harness import (
    BenchOptions,
    add_bench_args,
    bench,
    decode_weight_bytes,
    decode_weight_bytes_of,
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
                                prefill_lens=[8], repeat=1, bandwidth_mib=8, quantize=["int8", "int4"]))
    assert report["drift_prompts"] == "text"
    rows = {(r["impl"], r["batch"]) for r in report["measurements"] if r["kind"] == "decode"}
    assert {("ours-int8", 1), ("ours-int8", 2), ("ours-int4", 1), ("ours-int4", 2)} <= rows
    floats = {r["batch"]: r for r in report["measurements"] if r["impl"] == "ours" and r["kind"] == "decode"}
    for name, bits in (("int8", 8), ("int4", 4)):
        q = report["quantized"][name]
        assert q["bits"] == bits
        assert q["weight_bytes_per_token"] < report["roofline"]["weight_bytes_per_token"] / 2
        d = q["drift"]
        assert d["positions"] > 100 and (0.97 if bits == 8 else 0.9) < d["top1_agreement"] <= 1.0
        assert 0 < d["mean_abs"] <= d["max_abs"] < d["ref_max_abs"]
        for r in q["decode"]:
            assert r["vs_float"] == pytest.approx(r["tokens_per_s"] / floats[r["batch"]]["tokens_per_s"])
    # int4 rounds far more coarsely than int8
    assert report["quantized"]["int4"]["drift"]["mean_abs"] > report["quantized"]["int8"]["drift"]["mean_abs"]
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
