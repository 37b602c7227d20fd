"""Every inference fast path against the plain code it replaces (its reference twin)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qwen3next.ops.linear as linear_mod
from qwen3next import kernels
from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache
from qwen3next.ops.dispatch import set_fast_decode, set_linear_backend, set_threshold
from qwen3next.ops.gated_delta import gated_delta_step, recurrent_gated_delta_rule
from qwen3next.ops.moe import _experts_gathered, _experts_grouped_mm, experts_reference, route_topk
from qwen3next.ops.norm import rms_norm_gated, rms_norm_zero_centered
from qwen3next.quant.quantize import quantize_model
from tiny_models import make_model


@contextlib.contextmanager
def reference_paths():
    """The plain code everywhere: F.linear, no decode fast paths, no native kernels."""
    old_backend, old_fast = set_linear_backend("torch"), set_fast_decode(False)
    old_native = kernels.set_enabled(False)
    try:
        yield
    finally:
        set_linear_backend(old_backend)
        set_fast_decode(old_fast)
        kernels.set_enabled(old_native)


# ---- linear ------------------------------------------------------------------------------------------------------
needs_onednn = pytest.mark.skipif(linear_mod._ONEDNN_OP is None, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_onednn_linear_matches_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(1024, 512, generator=gen)
    x = torch.randn(2, rows, 512, generator=gen)
    with torch.no_grad():
        assert linear_mod.uses_onednn(x, w)
        y = linear_mod.linear(x, w)
    ref = F.linear(x, w)
    assert y.shape == ref.shape == (2, rows, 1024)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_linear_falls_back_where_onednn_must_not_run():
    w = torch.randn(1024, 512, requires_grad=True)
    x = torch.randn(4, 512)
    assert not linear_mod.uses_onednn(x, w)  # autograd: oneDNN's op has no backward
    y = linear_mod.linear(x, w)
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert not linear_mod.uses_onednn(x.bfloat16(), w.bfloat16())  # only fp32 is routed
        assert not linear_mod.uses_onednn(x, w[:, :256])  # non-contiguous weight
        assert not linear_mod.uses_onednn(x[:, :256], torch.randn(16, 256))  # small weight: MKL is faster


def test_linear_backend_switch_validates():
    with pytest.raises(ValueError, match="linear backend"):
        linear_mod.set_linear_backend("mkl")
    old = linear_mod.set_linear_backend("torch")
    try:
        with torch.no_grad():
            assert not linear_mod.uses_onednn(torch.randn(1, 512), torch.randn(1024, 512))
    finally:
        linear_mod.set_linear_backend(old)


# ---- norms -------------------------------------------------------------------------------------------------------
def test_fused_rms_norms_equal_the_formula():
    gen = torch.Generator().manual_seed(0)
    x, z, w = torch.randn(5, 3, 64, generator=gen), torch.randn(5, 3, 64, generator=gen), torch.randn(64, generator=gen)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(rms_norm_zero_centered(x, w, 1e-6), ref * (1 + w), atol=1e-6)
    assert torch.allclose(rms_norm_gated(x, z, w, 1e-6), ref * w * F.silu(z), atol=1e-6)


# ---- DeltaNet decode step ------------------------------------------------------------------------------------------
def test_gated_delta_step_equals_the_recurrent_form_and_updates_in_place():
    gen = torch.Generator().manual_seed(1)
    B, H, HV, K, V = 3, 2, 4, 8, 6
    q = F.normalize(torch.randn(B, 1, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, 1, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, 1, HV, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, 1, HV, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, 1, HV, generator=gen, dtype=torch.float64)
    s0 = torch.randn(B, HV, K, V, generator=gen, dtype=torch.float64)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    state = s0.clone()
    o = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
    assert (o - o_ref[:, 0]).abs().max() < 1e-12
    assert (state - s_ref).abs().max() < 1e-12  # the argument itself holds the new state


def test_gated_delta_step_rejects_bad_shapes():
    q = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="gated_delta_step"):
        gated_delta_step(q, q, torch.randn(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, 8, 4))
    with pytest.raises(ValueError, match="state must be"):
        gated_delta_step(q, q, torch.randn(2, 4, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4, 4, 8))


# ---- experts -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_fast_expert_forms_equal_the_reference(n_tokens):
    gen = torch.Generator().manual_seed(n_tokens)
    E, D, inter, k = 6, 32, 16, 2
    gate_up, down = torch.randn(E, 2 * inter, D, generator=gen), torch.randn(E, D, inter, generator=gen)
    x = torch.randn(n_tokens, D, generator=gen)
    weights, ids = route_topk(torch.randn(n_tokens, E, generator=gen), k, True)
    ref = experts_reference(x, weights, ids, gate_up, down)
    with torch.no_grad():
        assert (_experts_gathered(x, weights, ids, gate_up, down) - ref).abs().max() < 1e-4
        if hasattr(torch, "_grouped_mm"):
            assert (_experts_grouped_mm(x, weights, ids, gate_up, down) - ref).abs().max() < 1e-4


@pytest.fixture
def no_native():
    """torch's own quantized kernels (the native ones have their tests in test_kernels.py)."""
    old = kernels.set_enabled(False)
    yield
    kernels.set_enabled(old)


@pytest.mark.usefixtures("no_native")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_quantized_experts_fast_path_equals_grouped_path(bits, n_tokens):
    model = quantize_model(make_model("base", hidden_size=64, moe_intermediate_size=32), bits, group_size=32)
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(bits + n_tokens)
    x = torch.randn(n_tokens, 64, generator=gen)
    weights, ids = route_topk(torch.randn(n_tokens, experts.num_experts, generator=gen), 2, True)
    with torch.no_grad():
        assert experts._kernels_usable(x)
        fast = experts(x, weights, ids)
        with reference_paths():
            ref = experts(x, weights, ids)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.usefixtures("no_native")
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_int8_gathered_experts_equal_the_dequantized_reference(n_tokens):
    """The compiled decode step's int8 expert form (gather + dequantize + bmm), run eagerly here."""
    model = quantize_model(make_model("base", hidden_size=64, moe_intermediate_size=32), 8)
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(n_tokens)
    x = torch.randn(n_tokens, 64, generator=gen)
    weights, ids = route_topk(torch.randn(n_tokens, experts.num_experts, generator=gen), 2, True)
    with torch.no_grad():
        ref = experts.forward_reference(x, weights, ids)
        assert (experts._forward_gathered(x, weights, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---- K/V views -----------------------------------------------------------------------------------------------------
def test_kv_view_reads_the_same_rows_as_the_gather():
    pool = torch.randn(12 * 4, 2, 3)
    batch = BatchInfo([1, 1], [9, 6], slots=[0, 1], block_tables=[[0, 1, 2], [3, 4]]).prepare("cpu", 4, 12)
    assert batch.kv.view == (0, 12) and not batch.kv.sees_all_keys
    view = batch.kv.read(pool)
    assert view.data_ptr() == pool.data_ptr()  # no copy
    for b, total in enumerate([10, 7]):
        assert torch.equal(view[b, :total], pool[batch.kv.read_index[b, :total]])
    scattered = BatchInfo([1, 1], [9, 6], slots=[0, 1], block_tables=[[0, 2, 1], [3, 4]]).prepare("cpu", 4, 12)
    assert scattered.kv.view is None
    out_of_pool = BatchInfo([1], [5], slots=[0], block_tables=[[11, 12]]).prepare("cpu", 4, 12)
    assert out_of_pool.kv.view is None


# ---- whole model -----------------------------------------------------------------------------------------------------
def _decode_logits(model, prompt_ids, steps, slots, tables, num_slots=6, num_blocks=16, block_size=4):
    """Prefill each prompt into the given slots/blocks, then `steps` greedy decode steps; logits of every step."""
    cache = HybridCache(model.config, num_slots=num_slots, num_blocks=num_blocks, block_size=block_size)
    cache.zero_slots(slots)
    lens = [len(p) for p in prompt_ids]
    out = []
    with torch.no_grad():
        batch = BatchInfo(lens, [0] * len(lens), slots=slots, block_tables=tables)
        hidden = model.hidden_states(torch.cat(prompt_ids), model.context(batch, cache))
        last = torch.tensor(lens).cumsum(0) - 1
        logits = model.lm_head(hidden[last])
        out.append(logits)
        for _ in range(steps):
            tokens = logits.argmax(-1)
            batch = BatchInfo([1] * len(lens), lens, slots=slots, block_tables=tables)
            logits = model.lm_head(model.hidden_states(tokens, model.context(batch, cache)))
            out.append(logits)
            lens = [n + 1 for n in lens]
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["consecutive", "scattered"])
def test_fast_decode_equals_reference_decode(layout):
    model = make_model("base")
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (9, 5, 7)]
    if layout == "consecutive":  # state views and strided K/V views
        slots, tables = [0, 1, 2], [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    else:  # gathers and scatters
        slots, tables = [4, 0, 2], [[9, 2, 14, 0], [5, 11, 3, 7], [1, 13, 6, 10]]
    old_min = set_threshold("onednn_linear", 0)  # every fp32 linear through oneDNN (tiny weights are below it)
    try:
        fast = _decode_logits(model, prompts, 6, slots, tables)
    finally:
        set_threshold("onednn_linear", old_min)
    with reference_paths():
        ref = _decode_logits(model, prompts, 6, slots, tables)
    assert fast.shape == ref.shape
    assert (fast - ref).abs().max() < 1e-4
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
