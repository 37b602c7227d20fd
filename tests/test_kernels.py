"""The native CPU decode kernels (qwen3next/kernels): parity of each op with its torch twin (AVX2 and scalar code,
odd sizes, 1..8 rows), their use inside the model's modules, under torch.compile, bf16 storage, and the switches."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_quant import check_int4_search, int4_group_errors
from torch import nn

from qwen3next import kernels
from qwen3next.checkpoint import load_model
from qwen3next.model.generate import generate_tokens
from qwen3next.model.linear import Linear
from qwen3next.model.moe import Experts
from qwen3next.ops.moe import experts_reference, route_topk
from qwen3next.quant import Int4Linear, Int8Linear, QuantizedExperts, quantize_model
from qwen3next.quant.linear import (
    coded_scale_zero,
    decode_int4_grid,
    dequantize_int4,
    quantize_int4,
    quantize_int4_coded,
    quantize_int4_search,
    quantize_int8,
    scale_zero_of,
)
from tiny_models import make_model

DEMO = Path(__file__).resolve().parents[1] / "qwen3next" / "data" / "demo"

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels unavailable: {kernels.load_error()}")
ISAS = ["avx2", "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    old = kernels.set_isa(request.param)
    if kernels.set_isa(request.param) != request.param:  # returns the setting now in force
        pytest.skip("this CPU has no AVX2 + FMA")
    yield request.param
    kernels.set_isa(old)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def weight_in(fmt: int, N: int, K: int, group_size: int, gen: torch.Generator, coded: bool = False):
    """A random [N, K] weight stored in format `fmt`: (tensor, aux); int4 `coded`: coded group parameters."""
    w = torch.randn(N, K, generator=gen) * 0.1
    if fmt == kernels.FMT_F32:
        return w, None
    if fmt == kernels.FMT_BF16:
        return w.bfloat16(), None
    if fmt == kernels.FMT_INT8:
        return quantize_int8(w)
    if coded:
        q, sc, zc, factors = quantize_int4_coded(w, group_size)
        return q, coded_scale_zero(sc, zc, factors)
    q, s, z = quantize_int4(w, group_size)
    return q, scale_zero_of(s, z)


# K: a multiple of the vector widths, one with a tail of each, and one shorter than a vector; int4: groups of 64
# and of 32 and 16 (the vector code; two or four groups per 64-column chunk; an odd number of chunks, which one row
# against one row takes two at a time), of 32 and 16 with K not a multiple of 64 (scalar code); one activation row
# against rows of at most 512 columns takes four weight rows at a time (`tile4_i4_row`), longer rows one at a time
SHAPES = [(37, 128, 64), (64, 200, 64), (33, 11, 64), (16, 3, 64)]
INT4_SHAPES = [(37, 128, 64), (48, 256, 128), (33, 48, 16), (16, 64, 64), (41, 192, 32), (24, 96, 32),
               (43, 128, 16), (29, 320, 64), (21, 576, 64), (19, 640, 32)]


@pytest.mark.parametrize("fmt", kernels.FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_matches_its_twin(isa, fmt, rows):
    gen = torch.Generator().manual_seed(fmt * 10 + rows)
    for N, K, G in (INT4_SHAPES if fmt == kernels.FMT_INT4 else SHAPES):
        w, aux = weight_in(fmt, N, K, G, gen)
        x = torch.randn(rows, K, generator=gen)
        y = kernels.linear(x, w, aux, fmt, G if fmt == kernels.FMT_INT4 else 0)
        ref = kernels.linear_reference(x, w, aux, fmt, G if fmt == kernels.FMT_INT4 else 0)
        assert y.shape == (rows, N) and y.dtype == torch.float32
        assert rel_err(y, ref) < 1e-5, (fmt, N, K, G)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_coded_int4_matches_its_twin(isa, rows):
    """int4 with coded group parameters (uint8 scale_zero [K/G + 2, N, 2]): the same products as the twin, the group
    size taken from the parameters' shape (group_size 0), and `dequantize` equal to the torch dequantization."""
    gen = torch.Generator().manual_seed(rows)
    for N, K, G in INT4_SHAPES:
        w, aux = weight_in(kernels.FMT_INT4, N, K, G, gen, coded=True)
        x = torch.randn(rows, K, generator=gen)
        y = kernels.linear(x, w, aux, kernels.FMT_INT4, G)
        assert rel_err(y, kernels.linear_reference(x, w, aux, kernels.FMT_INT4)) < 1e-5, (N, K, G)
        assert torch.equal(kernels.linear(x, w, aux, kernels.FMT_INT4, 0), y)
        # a block of rows (the prefill path dequantizes [:, a:b] slices)
        assert rel_err(kernels.linear(x, w[5:21], aux[:, 5:21].contiguous(), kernels.FMT_INT4), y[:, 5:21]) < 1e-6
        from qwen3next.quant.linear import split_coded_scale_zero
        expected = dequantize_int4(w, *decode_int4_grid(*split_coded_scale_zero(aux)))
        assert torch.equal(kernels.dequantize(w, aux, kernels.FMT_INT4), expected)


def test_int4_twin_is_the_dequantized_product_up_to_activation_rounding():
    """The int4 twin's activation quantization is the only approximation: against the dequantized weight in fp64
    the error stays at the int8 rounding of the activations (~1/254 of a group's largest entry)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    q, s, z = quantize_int4(w, 64)
    x = torch.randn(4, 256, generator=gen)
    from qwen3next.quant.linear import dequantize_int4
    exact = x.double() @ dequantize_int4(q, s, z).double().T
    assert rel_err(kernels.linear_reference(x, q, scale_zero_of(s, z), 4, 64), exact) < 2e-2
    assert rel_err(kernels.linear(x, q, scale_zero_of(s, z), 4, 64), exact) < 2e-2


@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_native_int4_search_beats_the_minmax_grid(isa, group_size):
    check_int4_search(kernels.quantize_int4, group_size)


def test_native_int4_search_matches_its_torch_twin(isa):
    """Same choices as the torch twin except where fp32 sums in another order flip a near-tie (<2% of groups), and
    then the objective differs by rounding only; groups of 6 (scalar loops in the AVX2 build) included."""
    gen = torch.Generator().manual_seed(4)
    for N, K, G in ((64, 256, 64), (40, 96, 32), (24, 60, 6)):
        w = torch.randn(N, K, generator=gen) * 0.05
        a, b = kernels.quantize_int4(w, G), quantize_int4_search(w, G)
        same = ((a[1] == b[1]) & (a[2] == b[2])).float().mean().item()
        assert same > 0.98, (N, K, G, same)
        assert float(int4_group_errors(w, a, G).sum()) <= float(int4_group_errors(w, b, G).sum()) * (1 + 1e-3)


def test_int8_activations_are_rounded_per_block_of_32_only_where_k_allows():
    """int8 weights: with K a multiple of 32 the activations are rounded to int8 per 32 columns (the only
    approximation, ~1/254 of a block's largest entry); other K keep fp32 activations, exactly the dequantized
    product."""
    from qwen3next.quant.linear import dequantize_int8
    gen = torch.Generator().manual_seed(2)
    for K, bound in ((256, 1e-2), (200, 1e-5), (33, 1e-5)):
        q, s = quantize_int8(torch.randn(40, K, generator=gen))
        x = torch.randn(5, K, generator=gen)
        x[:, 7] = 30.0  # an outlier column: it coarsens only its own block's codes
        exact = x.double() @ dequantize_int8(q, s, torch.float64).T
        for isa_name in ISAS:
            old = kernels.set_isa(isa_name)
            try:
                got = kernels.linear(x, q, s, kernels.FMT_INT8)
            finally:
                kernels.set_isa(old)
            err = rel_err(got, exact)
            assert err < bound, (K, isa_name, err)
            if K % 32 == 0:
                assert err > 1e-6  # the rounding is there (a test that could not fail otherwise)
        # one row's result does not depend on the rows beside it (each row has its own codes)
        assert torch.allclose(kernels.linear(x[2:3], q, s, kernels.FMT_INT8),
                              kernels.linear(x, q, s, kernels.FMT_INT8)[2:3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", kernels.FORMATS)
@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_matches_its_twin(isa, fmt, tokens):
    gen = torch.Generator().manual_seed(fmt + tokens)
    E, D, inter, k = 6, 128, 64, 3
    G = 64 if fmt == kernels.FMT_INT4 else 0
    gu = [weight_in(fmt, 2 * inter, D, 64, gen) for _ in range(E)]
    dn = [weight_in(fmt, D, inter, 64, gen) for _ in range(E)]

    def stacked(mats, i):
        return None if mats[0][i] is None else torch.stack([m[i] for m in mats])

    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 4] = -30  # expert 4 gets no tokens
    weights, ids = route_topk(logits, k, True)
    x = torch.randn(tokens, D, generator=gen)
    args = (stacked(gu, 0), stacked(gu, 1), stacked(dn, 0), stacked(dn, 1), fmt, G)
    y = kernels.moe(x, weights, ids, *args)
    ref = kernels.moe_reference(x, weights, ids, *args)
    assert y.shape == x.shape and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_with_coded_int4_and_a_group_size_per_projection(isa, tokens):
    """Coded int4 experts with gate_up in groups of 32 and down in groups of 16 (each size read from its own
    parameters: group_size 0), against the twin."""
    gen = torch.Generator().manual_seed(40 + tokens)
    E, D, inter, k = 5, 128, 64, 2
    gu = [weight_in(kernels.FMT_INT4, 2 * inter, D, 32, gen, coded=True) for _ in range(E)]
    dn = [weight_in(kernels.FMT_INT4, D, inter, 16, gen, coded=True) for _ in range(E)]
    args = tuple(torch.stack([m[i] for m in mats]) for mats in (gu, dn) for i in (0, 1)) + (kernels.FMT_INT4, 0)
    weights, ids = route_topk(torch.randn(tokens, E, generator=gen), k, True)
    x = torch.randn(tokens, D, generator=gen)
    y = kernels.moe(x, weights, ids, *args)
    assert rel_err(y, kernels.moe_reference(x, weights, ids, *args)) < 1e-5


def test_bad_arguments_are_clear_errors():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="fmt 8 needs an int8 weight"):
        kernels.linear(x, torch.randn(8, 64), torch.ones(8, dtype=torch.bfloat16), 8)
    with pytest.raises(RuntimeError, match="x has 64 columns, the weight 32"):
        kernels.linear(x, torch.randn(8, 32), None, 32)
    with pytest.raises(RuntimeError, match="group_size 48 but the scale_zero holds groups of 64"):
        kernels.linear(x, torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(1, 8, 2, dtype=torch.bfloat16), 4, 48)
    with pytest.raises(RuntimeError, match="has 3 groups, which does not divide K = 64"):
        kernels.linear(x, torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(5, 8, 2, dtype=torch.uint8), 4)
    with pytest.raises(RuntimeError, match="int4 scale_zero: expected contiguous bfloat16"):
        kernels.linear(x, torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(4, 8, 2), 4)
    gu, dn = torch.randn(3, 16, 64), torch.randn(3, 64, 8)
    with pytest.raises(RuntimeError, match="expert id 3 out of range"):
        kernels.moe(x, torch.ones(2, 1), torch.tensor([[0], [3]]), gu, None, dn, None, 32)
    with pytest.raises(ValueError, match="isa: expected 'avx2' or 'scalar'"):
        kernels.set_isa("neon")


def test_ops_under_torch_compile():
    """The ops are opaque to torch.compile: their fake (shape) functions let a full graph trace through them."""
    gen = torch.Generator().manual_seed(3)
    q, s = quantize_int8(torch.randn(40, 64, generator=gen))
    gu, dn = torch.randn(4, 32, 64, generator=gen), torch.randn(4, 64, 16, generator=gen)

    def step(x, weights, ids):
        h = kernels.linear(x, q, s, kernels.FMT_INT8)
        return kernels.moe(x, weights, ids, gu, None, dn, None, 32) + h.sum(-1, keepdim=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 64, generator=gen)
    weights, ids = route_topk(torch.randn(3, 4, generator=gen), 2, True)
    assert torch.allclose(compiled(x, weights, ids), step(x, weights, ids))


# ---- inside the modules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 4])
def test_modules_take_the_native_path_and_match_their_references(rows):
    gen = torch.Generator().manual_seed(rows)
    lin = nn.Linear(128, 72, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 128, generator=gen) * 0.1)
    x = torch.randn(rows, 128, generator=gen)
    with torch.no_grad():
        int8 = Int8Linear.from_linear(lin)
        assert rel_err(int8(x), kernels.linear_reference(x, int8.qweight, int8.scales, 8)) < 1e-5
        assert rel_err(int8(x), int8.forward_reference(x)) < 1e-2  # activations rounded to int8 per 32 columns
        int4 = Int4Linear.from_linear(lin, 64)
        assert not int4.is_kernel_layout  # the canonical layout, which the native kernel reads
        assert rel_err(int4(x), kernels.linear_reference(x, int4.qweight, int4.scale_zero, 4, 64)) < 1e-5
        assert rel_err(int4(x), int4.forward_reference(x)) < 2e-2
        bf = Linear(128, 72, bias=False)
        bf.weight = nn.Parameter(lin.weight.detach().bfloat16(), requires_grad=False)
        assert rel_err(bf(x), F.linear(x, lin.weight.bfloat16().float())) < 1e-5
        x20 = torch.randn(20, 128, generator=gen)  # more rows than the kernel takes: the weight converted to fp32
        assert rel_err(bf(x20), F.linear(x20, lin.weight.bfloat16().float())) < 1e-5


@pytest.mark.parametrize("bits", [16, 32, 8, 4])
def test_experts_take_the_native_path(bits):
    gen = torch.Generator().manual_seed(bits)
    E, D, inter = 8, 128, 64
    experts = Experts(E, D, inter)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * inter, D, generator=gen) * 0.1)
        experts.down_proj.copy_(torch.randn(E, D, inter, generator=gen) * 0.1)
    x = torch.randn(5, D, generator=gen)
    weights, ids = route_topk(torch.randn(5, E, generator=gen), 2, True)
    with torch.no_grad():
        ref = experts_reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        if bits in (8, 4):
            q = QuantizedExperts.from_experts(experts, bits, 64)
            got, dequantized = q(x, weights, ids), q.forward_reference(x, weights, ids)
            aux = "scales" if bits == 8 else "scale_zero"
            twin = kernels.moe_reference(x, weights, ids, q.gate_up_proj_qweight, getattr(q, f"gate_up_proj_{aux}"),
                                         q.down_proj_qweight, getattr(q, f"down_proj_{aux}"), bits,
                                         64 if bits == 4 else 0)
            assert rel_err(got, twin) < 1e-5
            # activations rounded to int8 per block of 32 columns (int8) / per group (int4), in both projections
            assert rel_err(got, dequantized) < (2e-2 if bits == 8 else 5e-2)
            return
        if bits == 16:
            experts.gate_up_proj.data = experts.gate_up_proj.data.bfloat16()
            experts.down_proj.data = experts.down_proj.data.bfloat16()
            ref = experts_reference(x, weights, ids, experts.gate_up_proj.float(), experts.down_proj.float())
        old = kernels.set_enabled(False)
        try:
            fallback = experts(x, weights, ids)  # torch paths (bf16: converted to fp32 per call)
        finally:
            kernels.set_enabled(old)
        assert rel_err(experts(x, weights, ids), ref) < 1e-5 and rel_err(fallback, ref) < 1e-5


# ---- whole models ----------------------------------------------------------------------------------------------------
def _greedy(model, prompt, n, native: bool) -> list[int]:
    old = kernels.set_enabled(native)
    try:
        with torch.no_grad():
            return list(generate_tokens(model, prompt, n))
    finally:
        kernels.set_enabled(old)


def test_bf16_storage_of_a_bf16_checkpoint_is_lossless():
    """The demo checkpoint is bf16: storing its weights in bf16 and computing in fp32 gives the fp32 model's logits
    (to accumulation order) and its greedy tokens, with and without the native kernels."""
    model = load_model(DEMO, dtype=torch.float32).eval()
    stored = quantize_model(copy.deepcopy(model), 16)
    assert stored.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert stored.lm_head.weight.dtype == torch.bfloat16 and stored.dtype == torch.float32
    assert stored.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router stays in the model's dtype
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        assert rel_err(stored(ids), model(ids)) < 1e-5
    prompt = list(range(300, 340))
    plain = _greedy(model, prompt, 24, native=False)
    assert _greedy(model, prompt, 24, native=True) == plain
    assert _greedy(stored, prompt, 24, native=True) == plain
    assert _greedy(stored, prompt, 24, native=False) == plain


def test_bf16_storage_rejects_non_fp32_models():
    with pytest.raises(ValueError, match=r"quantize: bf16 storage computes in fp32 and needs a float32 model "
                                         r"\(--dtype float32\), got torch.bfloat16"):
        quantize_model(make_model("base", dtype=torch.bfloat16), 16)


@pytest.mark.parametrize("bits", [8, 4])
def test_native_quantized_decode_drifts_no_more_than_the_torch_paths(bits):
    """Demo model, decode steps after a prompt: the logits drift from the fp32 model with the native kernels against
    torch's quantized paths (bf16 activations). int8 (fp32 activations): the same (0.215 vs 0.205 mean |Δ logit|
    here). int4 (activations rounded to int8 per group of 64): 1.11 vs 1.00 (searched grids; 0.90 vs 0.72 with
    min-max grids), the price of integer dot products; bounded at 1.5x. The greedy tokens agree with the fp32
    model's about as often either way."""
    fp32 = load_model(DEMO, dtype=torch.float32).eval()
    quant = quantize_model(copy.deepcopy(fp32), bits, 64)
    ids = torch.arange(200, 232)[None]

    def decode_logits(model, native: bool) -> torch.Tensor:
        old = kernels.set_enabled(native)
        try:
            with torch.no_grad():
                cache = model.new_cache(1, 40)
                model(ids[:, :24], cache)
                return torch.cat([model(ids[:, t:t + 1], cache) for t in range(24, 32)], dim=1)
        finally:
            kernels.set_enabled(old)

    ref = decode_logits(fp32, native=False)
    native, torch_paths = decode_logits(quant, native=True), decode_logits(quant, native=False)
    drift_native, drift_torch = (native - ref).abs().mean(), (torch_paths - ref).abs().mean()
    assert drift_native <= (1.15 if bits == 8 else 1.5) * drift_torch, (drift_native, drift_torch)
    agree_native = (native.argmax(-1) == ref.argmax(-1)).sum()
    agree_torch = (torch_paths.argmax(-1) == ref.argmax(-1)).sum()
    assert agree_native >= agree_torch - 1


def test_without_a_compiler_the_torch_paths_run_after_one_warning(tmp_path):
    code = ("import warnings, torch\n"
            "from qwen3next import kernels\n"
            "from tiny_models import make_model\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = kernels.available()\n"
            "    model = make_model('base')\n"
            "    with torch.no_grad():\n"
            "        model(torch.tensor([[1, 2, 3]]))\n"
            "print(ok, sum('native CPU kernels unavailable' in str(w.message) for w in caught))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "1"]


def test_tracing_never_enters_the_build(monkeypatch):
    """Under torch.compile `available()` reports what was loaded before (a build inside a trace would break the
    graph: the compiled decode step then fell back to one graph per layer)."""
    monkeypatch.setattr(kernels, "_loaded", None)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return x + 1 if kernels.available() else x - 1

    assert torch.equal(f(torch.zeros(2)), -torch.ones(2))  # not loaded yet: the torch paths, and no graph break
    assert kernels._loaded is None


def test_prefill_sized_products_use_the_native_dequantized_weight():
    """More rows than the native kernel takes: the weight dequantized by `qwen3next::dequantize` (equal to the torch
    twins bit for bit), then an fp32 GEMM -- the dequantized product, with fp32 activations."""
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(128, 72, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 128, generator=gen) * 0.1)
        q8, s8 = quantize_int8(lin.weight)
        q4, s4, z4 = quantize_int4(lin.weight, 64)
        from qwen3next.quant.linear import dequantize_int4, dequantize_int8
        assert torch.equal(kernels.dequantize(q8, s8, 8), dequantize_int8(q8, s8))
        assert torch.equal(kernels.dequantize(q4, scale_zero_of(s4, z4), 4, 64), dequantize_int4(q4, s4, z4))
        x = torch.randn(600, 128, generator=gen)  # more than int4's 64-row limit
        for m in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 64)):
            assert rel_err(m(x), m.forward_reference(x)) < 1e-5


def test_bf16_experts_under_torch_compile_with_many_tokens():
    """More tokens than the native kernel takes, under torch.compile: the sync-free gathered form (no graph break)."""
    gen = torch.Generator().manual_seed(7)
    experts = Experts(6, 64, 32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(6, 64, 64, generator=gen) * 0.1)
        experts.down_proj.copy_(torch.randn(6, 64, 32, generator=gen) * 0.1)
    experts.gate_up_proj.data = experts.gate_up_proj.data.bfloat16()
    experts.down_proj.data = experts.down_proj.data.bfloat16()
    x = torch.randn(20, 64, generator=gen)
    weights, ids = route_topk(torch.randn(20, 6, generator=gen), 2, True)
    with torch.no_grad():
        ref = experts_reference(x, weights, ids, experts.gate_up_proj.float(), experts.down_proj.float())
        compiled = torch.compile(experts, backend="aot_eager", fullgraph=True)
        assert rel_err(compiled(x, weights, ids), ref) < 1e-5


# ---- decode attention ------------------------------------------------------------------------------------------------
# D: multiples of 64, 72 and 40 (column blocks and a tail of 8), a multiple of 8 only, and 12 (the scalar code);
# G = H / HKV query heads per K/V head: 4 and 8 (value rows shared by 4 heads per pass, the 80B's 16 / 2 of 256),
# 2 and 6 (2 per pass), 1 and 3 (one); fp32 and the 16-bit caches (`kv_cache_dtype`),
# whose twin widens the same stored values.
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("H", "HKV", "D"), [(8, 2, 64), (4, 2, 72), (3, 1, 24), (6, 3, 12), (2, 2, 256),
                                           (16, 2, 256), (6, 1, 40)])
def test_decode_attention_matches_its_twin(isa, H, HKV, D, kv_dtype):
    gen = torch.Generator().manual_seed(H * D)
    B, R, L = 3, 200, 150  # more keys than one block of 64, rows scattered over the pools
    q = torch.randn(B, H, D, generator=gen) * 2
    k_pool, v_pool = torch.randn(R, HKV, D, generator=gen), torch.randn(R, HKV, D, generator=gen)
    k_pool, v_pool = k_pool.to(kv_dtype), v_pool.to(kv_dtype)
    rows = torch.randint(0, R, (B, L), generator=gen)
    lens = torch.tensor([150, 1, 65])
    rows[1, 1:] = -5  # past lens: never read
    got = kernels.decode_attention(q, k_pool, v_pool, rows, lens, D ** -0.5)
    want = kernels.decode_attention_reference(q, k_pool, v_pool, rows.clamp_min(0), lens, D ** -0.5)
    assert got.shape == (B, H, D)
    assert rel_err(got, want) < 1e-5
    # the twin is SDPA over the gathered keys with the mask (what the model ran before the kernel)
    gathered_k = k_pool[rows.clamp_min(0)].float().transpose(1, 2)  # [B, HKV, L, D]
    gathered_v = v_pool[rows.clamp_min(0)].float().transpose(1, 2)
    mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(q[:, :, None], gathered_k, gathered_v, attn_mask=mask,
                                          enable_gqa=H != HKV)[:, :, 0]
    assert rel_err(got, sdpa) < 1e-5


def test_decode_attention_bad_arguments_are_clear_errors():
    q, pool = torch.randn(1, 4, 8), torch.randn(10, 2, 8)
    rows, lens = torch.zeros(1, 5, dtype=torch.long), torch.tensor([5])
    with pytest.raises(RuntimeError, match="lens\\[0\\] = 6 outside \\[1, 5\\]"):
        kernels.decode_attention(q, pool, pool, rows, torch.tensor([6]), 1.0)
    with pytest.raises(RuntimeError, match="row 10 outside the pools' 10"):
        kernels.decode_attention(q, pool, pool, torch.full((1, 5), 10), lens, 1.0)
    with pytest.raises(RuntimeError, match="need a multiple"):
        kernels.decode_attention(torch.randn(1, 3, 8), pool, pool, rows, lens, 1.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16, both the same"):
        kernels.decode_attention(q, pool.bfloat16(), pool.half(), rows, lens, 1.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        kernels.decode_attention(q, pool.double(), pool.double(), rows, lens, 1.0)
    with pytest.raises(RuntimeError, match="q must be float32"):
        kernels.decode_attention(q.bfloat16(), pool, pool, rows, lens, 1.0)


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.float16])
def test_compiled_style_decode_takes_the_native_attention_and_matches_sdpa(kv_dtype):
    """A decode step read by index (what the compiled and ahead-of-time steps do) runs the kernel; with the kernels
    off it runs SDPA over the gathered rows: same hidden states. Also on a 16-bit cache (`kv_cache_dtype`): the
    kernel widening in registers and the torch path widening after the gather read the same stored rows."""
    from qwen3next.model import attention
    from qwen3next.model.batch import BatchInfo
    from qwen3next.model.cache import HybridCache

    model = make_model("base")
    cache = HybridCache(model.config, num_slots=3, num_blocks=8, block_size=4, layout=model.cache_layout(),
                        kv_dtype=kv_dtype)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompt = BatchInfo([6, 3], [0, 0], [2, 0], [[5, 1], [3]])
        model.hidden_states(torch.randint(0, 97, (9,), generator=gen), model.context(prompt, cache))
    pools = [*cache.k.values(), *cache.v.values(), *(t for d in cache.state.values() for t in d.values())]
    saved = [t.clone() for t in pools]
    calls = []
    real = kernels.decode_attention

    def counting(*args):
        calls.append(1)
        return real(*args)

    tokens = torch.randint(0, 97, (2,), generator=gen)
    outs = []
    for native in (True, False):
        for t, s in zip(pools, saved):
            t.copy_(s)
        previous = kernels.set_enabled(native)
        try:
            with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
                mp.setattr(attention.kernels, "decode_attention", counting)
                step = BatchInfo([1, 1], [6, 3], [2, 0], [[5, 1], [3]])
                outs.append(model.hidden_states(tokens, model.context(step, cache, views=False)))
        finally:
            kernels.set_enabled(previous)
        assert len(calls) == 1  # "base" has one attention layer: one call with the kernels on, none with them off
    assert rel_err(outs[0], outs[1]) < 1e-5
