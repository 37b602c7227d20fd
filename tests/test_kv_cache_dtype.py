"""`kv_cache_dtype` (vLLM's name): attention K/V pools in bf16 or fp16 under fp32 activations. The keys and values are
rounded once when stored and widened when read, by the decode attention kernel (its parity with its fp64 twin and
with the model's torch path over the same stored values is in test_kernels.py) and by the torch paths; everything
else (DeltaNet states, activations) keeps its dtype."""

from __future__ import annotations

import pytest
import torch
from test_compiled_decode import needs_compiler

from qwen3next.engine.llm import Engine
from qwen3next.engine.runner import cache_geometry
from qwen3next.engine.sampling import SamplingParams
from qwen3next.model.cache import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from qwen3next.tokenizer import Tokenizer
from tiny_models import make_model, write_byte_tokenizer

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def model():
    return make_model("base", vocab_size=261, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv_tok")
    write_byte_tokenizer(d)
    return Tokenizer.from_dir(d)


def greedy_loop(model, prompt: list[int], n: int, kv_cache_dtype) -> list[int]:
    """The plain reference: one prompt forward, then one token per forward, argmax, on a `model.new_cache` whose K/V
    pools have `kv_cache_dtype`."""
    cache = model.new_cache(1, len(prompt) + n, kv_cache_dtype=kv_cache_dtype)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache)[0, -1]
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache)[0, -1]
    return out


def test_resolve_kv_cache_dtype_and_bad_values():
    from qwen3next.argtypes import KV_CACHE_DTYPE_CHOICES

    assert KV_CACHE_DTYPE_CHOICES == ("auto", *KV_CACHE_DTYPES)  # the CLI's choices (argtypes stays torch-free)
    assert resolve_kv_cache_dtype("auto", torch.float32) is torch.float32
    assert resolve_kv_cache_dtype(None, torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32) is torch.float16
    assert resolve_kv_cache_dtype(torch.bfloat16, torch.float32) is torch.bfloat16
    for bad in ("fp8", "half", torch.int8, 16):
        with pytest.raises(ValueError, match="kv_cache_dtype: expected 'auto' or one of"):
            resolve_kv_cache_dtype(bad, torch.float32)


def test_engine_rejects_a_bad_kv_cache_dtype_before_loading(model):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(model, kv_cache_dtype="fp8", skip_tokenizer_init=True)


@pytest.mark.parametrize("kv_dtype", HALF)
def test_16bit_cache_stores_rounded_values_and_stays_near_fp32(model, kv_dtype):
    """The same prompt and decode steps on an fp32 and a 16-bit cache: the pools hold exactly the fp32 cache's keys
    and values rounded to the 16-bit dtype (the rounding happens once, at the write), DeltaNet states keep fp32, and
    the logits move by no more than that rounding explains."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 261, (1, 40), generator=gen)
    steps = torch.randint(0, 261, (5,), generator=gen)
    caches, logits = {}, {}
    with torch.no_grad():
        for dt in (torch.float32, kv_dtype):
            cache = model.new_cache(1, 64, kv_cache_dtype=dt)
            out = [model(prompt, cache)[0, -1]]
            out += [model(t.view(1, 1), cache)[0, -1] for t in steps]
            caches[dt], logits[dt] = cache.hybrid, torch.stack(out)
    ref, half = caches[torch.float32], caches[kv_dtype]
    for key in ref.k:
        assert half.k[key].dtype == half.v[key].dtype == kv_dtype
    for key in (str(i) for i in model.config.attention_layers):  # the MTP layer's pools stay unwritten here
        rows = slice(0, 45)
        # not bitwise: the fp32 path's later keys saw fp32 context, the 16-bit path's a rounded one
        for a, b in ((half.k[key], ref.k[key]), (half.v[key], ref.v[key])):
            assert (a[rows].float() - b[rows].to(kv_dtype).float()).abs().max() <= 0.02 * b[rows].abs().max()
            assert not torch.equal(a[rows].float(), b[rows])  # rounded: a 16-bit cache really is one
    assert all(p.dtype == torch.float32 for d in half.state.values() for p in d.values())
    diff = (logits[kv_dtype] - logits[torch.float32]).abs().max()
    assert 0 < diff < 0.05 * logits[torch.float32].abs().max()


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_engine_with_a_16bit_cache_gives_the_plain_loop_tokens(model, tokenizer, kv_dtype):
    """The engine (chunked prefill, batches of several sequences, multi-step decoding) with kv_cache_dtype 16-bit:
    its pools are 16-bit and half the bytes per token of the fp32 engine's, and its greedy tokens equal the plain
    loop's on a cache of the same dtype."""
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=4, max_num_batched_tokens=64,
                    max_model_len=256, prefill_chunk_size=32, block_size=16, kv_cache_dtype=kv_dtype)
    engine.scheduler.config.multi_step_seconds = 60.0
    assert all(p.dtype == getattr(torch, kv_dtype) for p in (*engine.runner.cache.k.values(),
                                                              *engine.runner.cache.v.values()))
    assert engine.plan.geometry.kv_bytes_per_token * 2 == cache_geometry(model, 16).kv_bytes_per_token
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (70, 5, 33)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.step():
        pass
    for r, p in zip(reqs, prompts):
        assert r.output().token_ids == greedy_loop(model, p, 16, kv_dtype)


@needs_compiler
def test_compiled_engine_with_a_16bit_cache_decodes_like_eager(tmp_path, monkeypatch):
    """compile_decode with kv_cache_dtype float16: the ahead-of-time step program (built for the 16-bit pools: their
    dtype is in its key) takes every decode step, and the greedy tokens equal the eager loop's on a 16-bit cache."""
    from qwen3next.ops.dispatch import set_aot_decode

    monkeypatch.setenv("QWEN3NEXT_AOT_CACHE", str(tmp_path / "aot"))
    previous = set_aot_decode(True)
    try:
        model = make_model("mlp_only", vocab_size=261)
        write_byte_tokenizer(tmp_path)
        engine = Engine(model, tokenizer=Tokenizer.from_dir(tmp_path), max_memory="32MiB", max_num_seqs=3,
                        max_model_len=96, block_size=16, compile_decode=True, kv_cache_dtype="float16")
        compiled = engine.runner.compiled
        assert compiled.aot_step(engine.runner.cache) is not None

        def no_torch_compile(*args, **kwargs):
            raise AssertionError("this step should have run through the ahead-of-time library")

        compiled._stack = no_torch_compile
        gen = torch.Generator().manual_seed(4)
        prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 21, 3)]
        reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts]
        while engine.step():
            pass
        for r, p in zip(reqs, prompts):
            assert r.output().token_ids == greedy_loop(model, p, 12, "float16")
    finally:
        set_aot_decode(previous)
