"""Logits parity against HF transformers' Qwen3NextForCausalLM on its reliable path (full forward, no padding)."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_model

transformers = pytest.importorskip("transformers")


def hf_model(model, tmp_path, dtype):
    model.save_pretrained(tmp_path)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    return hf.eval()


@pytest.mark.parametrize("name", ["base", "mlp_only", "yarn"])
def test_fp32_logits_match_transformers(name, tmp_path):
    model = make_model(name)
    hf = hf_model(model, tmp_path, torch.float32)
    gen = torch.Generator().manual_seed(1)
    for T in (1, 63, 65, 130):
        ids = torch.randint(0, model.config.vocab_size, (2, T), generator=gen)
        with torch.no_grad():
            ours = model(ids)
            ref = hf(input_ids=ids, use_cache=False).logits
        err = (ours - ref).abs().max().item()
        assert err <= 1e-4, f"{name} T={T}: max |dlogits| = {err}"


def test_bf16_logits_close_to_transformers(tmp_path):
    model = make_model("base").to(torch.bfloat16)
    hf = hf_model(model, tmp_path, torch.bfloat16)
    ref32 = make_model("base")  # the same weights in fp32, as the accuracy yardstick
    ids = torch.randint(0, model.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs, exact = model(ids).float(), hf(input_ids=ids, use_cache=False).logits.float(), ref32(ids)
    def mean_rel(x):
        return ((x - exact).abs().mean() / exact.abs().mean()).item()

    # Measured on this setup: mean relative error 3.6% (ours) vs 5.7% (transformers' own bf16 path); top-1 agreement
    # with fp32 98% vs 94%. bf16 rounding through the layers dominates; we keep more of the math in fp32.
    assert mean_rel(ours) < 0.06, mean_rel(ours)
    assert mean_rel(ours) <= mean_rel(theirs) * 1.2, (mean_rel(ours), mean_rel(theirs))
    agree = (ours.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree > 0.93, agree
