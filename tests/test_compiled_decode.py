"""The torch.compile'd decode step (opt-in) against the eager code, through the engine as users run it."""

from __future__ import annotations

import shutil

import pytest
import torch

from qwen3next.engine.compiled import CompiledDecoder, CompileDecodeError
from qwen3next.engine.llm import Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache
from qwen3next.model.generate import generate_tokens
from tiny_models import make_model, write_byte_tokenizer


def _inductor_works() -> str | None:
    """None if torch.compile can build and run a trivial CPU kernel here, else why not (no compiler, no headers)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile on CPU (inductor) needs a C++ compiler"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as e:  # what inductor raises depends on what is missing
        return f"torch.compile does not work on this machine: {type(e).__name__}: {str(e)[:200]}"
    return None


_WHY_NOT = _inductor_works()
needs_compiler = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


@needs_compiler
def test_compiled_engine_decodes_exactly_like_eager(tmp_path):
    """Mixed prompt lengths, batch sizes changing as requests finish and new ones arrive, decode steps in multi-step
    runs (the step's argmax from the LM head after torch.compile's stack): every greedy token equals the eager plain
    loop, and the logits of compiled decode steps match eager ones."""
    from qwen3next.tokenizer import Tokenizer

    model = make_model("base", vocab_size=261)
    write_byte_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 37, 12, 1, 20)]
    engine = Engine(model, tokenizer=tokenizer, max_memory="32MiB", max_num_seqs=3, max_model_len=128,
                    block_size=16, compile_decode=True)
    compiled = engine.runner.compiled
    assert compiled is not None
    engine.scheduler.config.multi_step_seconds = 60.0  # multi-step runs of torch.compile'd steps, whatever the speed
    runs, execute = [], engine.runner.execute
    engine.runner.execute = lambda batch: runs.append(batch.num_steps) or execute(batch)
    graphs = dict(torch._dynamo.utils.counters["stats"])
    lengths = (6, 10, 3, 8, 5)
    reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, lengths)]
    while engine.step():
        pass
    compiled_out = [r.output().token_ids for r in reqs]
    # The warm-up covered every batch size (1-3) and length served: nothing compiled while serving.
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs
    assert max(runs) > 1

    # Logits of one compiled decode step vs the same step run eagerly, on a scattered layout of the engine's own
    # cache (now unused; its pool sizes are the ones compiled for).
    cache = engine.runner.cache
    cache.zero_slots([2])
    tokens = torch.tensor(prompts[1][:9])
    with torch.no_grad():
        model.hidden_states(tokens, model.context(BatchInfo([9], [0], [2], [[5, 2]]), cache))
        snapshot = [(pool, pool.clone()) for pools in cache.state.values() for pool in pools.values()]
        step = BatchInfo([1], [9], [2], [[5, 2]])
        compiled_logits = model.lm_head(compiled.hidden_states(tokens[:1], step, cache))
        for pool, saved in snapshot:
            pool.copy_(saved)
        step = BatchInfo([1], [9], [2], [[5, 2]])
        eager_logits = model.lm_head(model.hidden_states(tokens[:1], model.context(step, cache)))
    assert (compiled_logits - eager_logits).abs().max() < 1e-4
    for p, n, out in zip(prompts, lengths, compiled_out):
        assert out == list(generate_tokens(model, p, n))


def _teacher_forced_logits(model, ids, prefix, compiled=None):
    """Prefill ids[:, :prefix], then decode the rest one token at a time (the given tokens, not sampled ones), through
    the compiled decoder when given."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    step = compiled.decode_logits if compiled is not None else model
    with torch.no_grad():
        out = [model(ids[:, :prefix], cache)[:, -1]]
        out += [step(ids[:, t:t + 1], cache)[:, -1] for t in range(prefix, ids.shape[1])]
    return torch.stack(out, dim=1)


@needs_compiler
def test_compiled_int8_decode_matches_eager_int8():
    """int8 models compile too (gathered, dequantized experts; the int8 kernel for the Linears). The compiled experts
    see fp32 activations where the eager kernels round them to bf16, so logits agree to bf16 rounding, not exactly."""
    from qwen3next.quant.quantize import quantize_model

    model = quantize_model(make_model("base", hidden_size=64, moe_intermediate_size=32), 8)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    eager = _teacher_forced_logits(model, ids, 6)
    compiled = _teacher_forced_logits(model, ids, 6, CompiledDecoder(model))
    assert compiled.shape == eager.shape == (2, 15, model.config.vocab_size)
    assert 0 < (compiled - eager).abs().max() < 0.02 * eager.abs().max()  # > 0: the compiled graph really ran
    assert (compiled.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


def test_warm_up_on_a_too_small_cache_is_a_clear_error():
    model = make_model("base")
    with pytest.raises(ValueError, match="at least 2 slots"):
        CompiledDecoder(model).warm_up(HybridCache(model.config, num_slots=1, num_blocks=2, block_size=4))


def test_compile_failure_is_reported_and_decoding_stays_eager(monkeypatch):
    from qwen3next.engine.memory import plan_cache
    from qwen3next.engine.runner import ModelRunner, cache_geometry

    model = make_model("base")

    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(CompiledDecoder, "hidden_states", broken)
    plan = plan_cache(cache_geometry(model, 4), 4 << 20, max_num_seqs=3, max_model_len=8)
    with pytest.raises(CompileDecodeError, match="no working C\\+\\+ compiler"):
        ModelRunner(model, plan, compile_decode=True)
