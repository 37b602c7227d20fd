"""`qwen3next bench --ablation attention`: the twins are what they claim to be, the batch-4 decode starts from true
copies of the prefilled sequence, and the command writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3next.bench import ablation, measure
from qwen3next.cli import main
from qwen3next.train.presets import preset_config


def test_twins_change_only_what_they_claim():
    configs = ablation.ablation_configs("small")
    hybrid, full, dense = configs["hybrid"], configs["full_attention"], configs["dense"]
    base = preset_config("small")
    assert hybrid.layer_types == base.layer_types and "linear_attention" in hybrid.layer_types
    assert full.layer_types == ["full_attention"] * base.num_hidden_layers
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "vocab_size"):
        assert getattr(full, name) == getattr(base, name), name
    assert dense.layer_types == ["full_attention"] * base.num_hidden_layers
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    assert dense.hidden_size == 2 * base.hidden_size
    # the release's compute ratio: non-embedding parameters ~ 32B / 3B of the hybrid's active ones
    ratio = ablation.describe_configs(configs)["dense"]["active_ratio_to_hybrid"]
    assert abs(ratio - 32 / 3) < 0.5
    assert all(c.num_nextn_predict_layers == 0 for c in configs.values())


def test_batch_rows_copied_from_the_prefilled_sequence_decode_like_it():
    """After `_copy_sequence`, row 1 holds sequence 0's K/V and DeltaNet state: a decode step of both rows with the
    same token gives the same logits, equal to sequence 0 decoding alone."""
    config = ablation.ablation_configs("tiny")["hybrid"]
    model = measure.random_weights(config, torch.float32, 0)
    ids = torch.randint(0, config.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache(2, 160, block_size=64)
        ablation._forward(model, cache, [0], ids[:100], 100)
        ablation._forward(model, cache, [0], ids[100:], 50)
        alone = model.new_cache(1, 160, block_size=64)
        ablation._forward(model, alone, [0], ids, 150)
        ablation._copy_sequence(cache, 0, 1)
        assert cache.lengths == [150, 150]
        tok = torch.tensor([7, 7])
        both = ablation._forward(model, cache, [0, 1], tok, 1)
        one = ablation._forward(model, alone, [0], tok[:1], 1)
    torch.testing.assert_close(both[0], both[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[0], one[0], atol=1e-4, rtol=1e-4)


def test_hybrid_cache_grows_slower_than_its_twins():
    configs = ablation.ablation_configs("small")
    small, big = (ablation.cache_bytes(configs["hybrid"], n, 2) for n in (1024, 32768))
    twin_small, twin_big = (ablation.cache_bytes(configs["full_attention"], n, 2) for n in (1024, 32768))
    assert big - small == configs["hybrid"].kv_bytes_per_token(2) * (32768 - 1024)
    assert (twin_big - twin_small) == 4 * (big - small)  # 8 attention layers vs 2


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "abl.json", tmp_path / "abl.png"
    args = ["bench", "--ablation", "attention", "--preset", "tiny", "--contexts", "64", "96", "--repeat", "1",
            "--decode-tokens", "2", "--threads", "1", "--json", str(out)]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(png)]
    except ImportError:
        png = None
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "hybrid / ..." in table and "full_attention" in table and "dense" in table
    report = json.loads(out.read_text())
    assert {(r["model"], r["context"]) for r in report["rows"]} == {
        (m, c) for m in ("hybrid", "full_attention", "dense") for c in (64, 96)}
    assert all(r["prefill_tok_s"] > 0 and r["decode_b1_tok_s"] > 0 and r["decode_b4_tok_s"] > 0
               for r in report["rows"])
    assert len(report["ratios"]) == 4
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--ablation", "attention", "--model", "."], "--ablation builds its three models"),
    (["--contexts", "64"], "go with --ablation"),
    (["--ablation", "attention", "--preset", "tiny", "--contexts", "1"], "contexts: expected token counts >= 2"),
])
def test_bad_ablation_arguments_are_clear_errors(argv, message, capsys):
    assert main(["bench", *argv]) != 0
    assert message in capsys.readouterr().err
