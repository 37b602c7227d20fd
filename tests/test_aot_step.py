"""The ahead-of-time decode step (engine/aot_step.py) against the eager step it is built from: hidden states, the
K/V rows and DeltaNet states it writes, greedy output through the engine, its disk cache and its failure modes.

Each package costs ~20-40 s of compiling on 2 cores; the tests share one cache directory so that the fp32 package is
built once (test_aot_step_matches_eager...) and loaded by the others."""

from __future__ import annotations

import pytest
import torch
from test_compiled_decode import needs_compiler

from qwen3next.engine.aot_step import AOTDecodeStep, AOTStepError, package_path
from qwen3next.engine.compiled import CompiledDecoder
from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache
from qwen3next.ops.dispatch import set_aot_decode
from tiny_models import make_model, write_byte_tokenizer


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("aot")


@pytest.fixture
def aot_on(aot_dir, monkeypatch):
    monkeypatch.setenv("QWEN3NEXT_AOT_CACHE", str(aot_dir))
    previous = set_aot_decode(True)
    yield aot_dir
    set_aot_decode(previous)


def _no_torch_compile(*args, **kwargs):
    raise AssertionError("this step should have run through the ahead-of-time library, not torch.compile")


def _pools(cache: HybridCache) -> list[torch.Tensor]:
    return [*cache.k.values(), *cache.v.values(), *(p for d in cache.state.values() for p in d.values())]


def _cache(model, num_slots: int, num_blocks: int, block_size: int = 4) -> HybridCache:
    return HybridCache(model.config, num_slots=num_slots, num_blocks=num_blocks, block_size=block_size,
                       layout=model.cache_layout(include_mtp=False))


def _prefill(model, cache, lens, slots, tables, gen):
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lens]
    with torch.no_grad():
        batch = BatchInfo(list(lens), [0] * len(lens), slots, tables)
        model.hidden_states(torch.cat(prompts), model.context(batch, cache))


def _steps_both_ways(model, compiled, cache, lens, slots, tables, steps, gen):
    """Decode `steps` tokens for every sequence through the compiled decoder on `cache` and eagerly on a copy of
    it; returns the largest |Δ| of the hidden states and of the logits the step computes with them over the steps,
    and the two caches."""
    eager_cache = _cache(model, cache.num_slots, cache.num_blocks, cache.block_size)
    for a, b in zip(_pools(eager_cache), _pools(cache)):
        a.copy_(b)
    worst = 0.0
    with torch.no_grad():
        for t in range(steps):
            tokens = torch.randint(0, model.config.vocab_size, (len(lens),), generator=gen)
            ctx_lens = [n + t for n in lens]
            fast, logits, argmax = compiled.decode(tokens, BatchInfo([1] * len(lens), ctx_lens, slots, tables), cache)
            batch = BatchInfo([1] * len(lens), ctx_lens, slots, tables)
            ref = model.hidden_states(tokens, model.context(batch, eager_cache))
            assert logits is not None and logits.dtype == torch.float32 and torch.equal(argmax, logits.argmax(-1))
            worst = max(worst, (fast - ref).abs().max().item(), (logits - model.lm_head(ref)).abs().max().item())
    return worst, eager_cache


@needs_compiler
def test_aot_step_matches_eager_and_serves_every_batch_size_from_one_package(aot_on):
    """Odd config (dense MLP layers, 3 heads, 5 experts), three sequences of different lengths in scattered slots and
    blocks, four steps; then one sequence alone and a cache of another size: the same package, no second compile."""
    model = make_model("mlp_only", vocab_size=261)  # the engine tests' model and block size: one package for all
    cache = _cache(model, num_slots=6, num_blocks=16, block_size=16)
    gen = torch.Generator().manual_seed(0)
    lens, slots, tables = [13, 30, 2], [4, 1, 3], [[7, 2], [0, 5, 9], [11]]  # the first two cross a block
    _prefill(model, cache, lens, slots, tables, gen)
    built: list[str] = []
    compiled = CompiledDecoder(model, log_fn=built.append)
    compiled._stack = _no_torch_compile
    worst, eager_cache = _steps_both_ways(model, compiled, cache, lens, slots, tables, 4, gen)
    assert worst < 1e-5
    for fast, ref in zip(_pools(cache), _pools(eager_cache)):  # the K/V rows and states it wrote, in place
        assert (fast - ref).abs().max() < 1e-5
    assert len(built) == 1 and package_path(model, cache).is_file()

    # batch 1, a longer context, the same library
    worst, _ = _steps_both_ways(model, compiled, cache, [30 + 4], [1], [[0, 5, 9, 8, 12]], 3, gen)
    assert worst < 1e-5

    # another engine's cache (other pool sizes) and a new decoder: loaded from disk, not compiled again
    other = _cache(model, num_slots=3, num_blocks=7, block_size=16)
    _prefill(model, other, [6], [2], [[3, 1]], gen)
    again = CompiledDecoder(model, log_fn=built.append)
    again._stack = _no_torch_compile
    worst, _ = _steps_both_ways(model, again, other, [6], [2], [[3, 1, 4]], 2, gen)
    assert worst < 1e-5 and len(built) == 1
    with torch.no_grad(), pytest.raises(ValueError, match="cannot hold 33 tokens"):  # 2 blocks of 16 rows
        again.hidden_states(torch.zeros(1, dtype=torch.long), BatchInfo([1], [32], [2], [[3, 1]]), other)
    with torch.no_grad(), pytest.raises(ValueError, match="outside the cache's 3 slots and 7 blocks"):
        again.hidden_states(torch.zeros(1, dtype=torch.long), BatchInfo([1], [6], [2], [[3, 7]]), other)


@needs_compiler
def test_aot_runs_of_steps_equal_single_steps(aot_on):
    """`decode_steps(n)` (the engine's multi-step decoding: n steps back to back, each fed the argmax of the one
    before, inputs advanced as tensors) gives the tokens, hidden states, K/V rows and DeltaNet states of n single
    steps; a run the
    block tables cannot hold is refused before anything runs."""
    model = make_model("mlp_only", vocab_size=261)
    cache = _cache(model, num_slots=6, num_blocks=16, block_size=16)
    gen = torch.Generator().manual_seed(4)
    lens, slots, tables = [13, 30, 2], [4, 1, 3], [[7, 2], [0, 5, 9], [11]]
    _prefill(model, cache, lens, slots, tables, gen)
    single = _cache(model, cache.num_slots, cache.num_blocks, cache.block_size)
    for a, b in zip(_pools(single), _pools(cache)):
        a.copy_(b)
    compiled = CompiledDecoder(model)
    compiled._stack = _no_torch_compile
    tokens = torch.randint(0, 261, (3,), generator=gen)
    with torch.no_grad():
        picked, hidden = compiled.decode_steps(tokens, BatchInfo([1] * 3, lens, slots, tables), cache, 5,
                                               keep_hidden=True)
        steps, states, tok = [], [], tokens
        for t in range(5):
            h, _, tok = compiled.decode(tok, BatchInfo([1] * 3, [n + t for n in lens], slots, tables), single)
            steps.append(tok)
            states.append(h)
    assert picked.shape == (5, 3) and torch.equal(picked, torch.stack(steps))
    assert hidden.shape == (5, 3, model.config.hidden_size) and torch.equal(hidden, torch.stack(states))
    for a, b in zip(_pools(cache), _pools(single)):
        assert torch.equal(a, b)
    before = [p.clone() for p in _pools(cache)]
    with torch.no_grad(), pytest.raises(ValueError, match="cannot hold"):  # sequence 1: 35 + 14 > 3 blocks of 16
        compiled.decode_steps(tokens, BatchInfo([1] * 3, [n + 5 for n in lens], slots, tables), cache, 14)[0]
    assert all(torch.equal(a, b) for a, b in zip(_pools(cache), before))


@needs_compiler
def test_aot_int8_step_runs_the_native_kernels_like_eager(aot_on):
    """An int8 model: the package calls the same native linear / MoE ops as the eager step."""
    from qwen3next.quant.quantize import quantize_model

    model = quantize_model(make_model("base", hidden_size=64, moe_intermediate_size=32), 8)
    cache = _cache(model, num_slots=3, num_blocks=10)
    gen = torch.Generator().manual_seed(1)
    lens, slots, tables = [7, 3], [2, 0], [[4, 5, 9], [1, 8]]
    _prefill(model, cache, lens, slots, tables, gen)
    compiled = CompiledDecoder(model)
    compiled._stack = _no_torch_compile
    worst, eager_cache = _steps_both_ways(model, compiled, cache, lens, slots, tables, 3, gen)
    assert worst < 1e-4
    for fast, ref in zip(_pools(cache), _pools(eager_cache)):
        assert (fast - ref).abs().max() < 1e-4


@needs_compiler
def test_engine_with_aot_step_decodes_exactly_like_eager(aot_on, tmp_path):
    """`Engine(compile_decode=True)` with at most 3 sequences: warm-up builds (here: loads) only the library, every
    decode step runs through it (runs of several steps too: multi-step decoding), and greedy tokens equal the eager
    loop's."""
    from qwen3next.engine.llm import Engine
    from qwen3next.tokenizer import Tokenizer

    model = make_model("mlp_only", vocab_size=261)
    write_byte_tokenizer(tmp_path)
    engine = Engine(model, tokenizer=Tokenizer.from_dir(tmp_path), max_memory="32MiB", max_num_seqs=3,
                    max_model_len=96, block_size=16, compile_decode=True)
    compiled = engine.runner.compiled
    assert compiled.aot_step(engine.runner.cache) is not None
    compiled._stack = _no_torch_compile
    engine.scheduler.config.multi_step_seconds = 60.0  # multi-step runs whatever this machine's speed
    runs, decode_steps = [], compiled.decode_steps
    compiled.decode_steps = lambda *a, **k: runs.append(a[3]) or decode_steps(*a, **k)
    _assert_greedy_like_eager(engine, model, 2, (5, 23, 11, 1), (6, 9, 4, 7))
    assert runs and max(runs) > 1


@needs_compiler
def test_aot_step_with_a_prompt_token_that_is_not_sampled(aot_on, tmp_path):
    """A token budget of 3 for 3 sequences: while two decode, the third's prompt comes one token a step, so steps
    of one token per sequence hold rows that are not sampled (a prompt's inner tokens). The step program's logits
    cover every row; the sampled ones are picked from them, and greedy tokens equal the eager loop's."""
    from qwen3next.engine.llm import Engine
    from qwen3next.tokenizer import Tokenizer

    model = make_model("mlp_only", vocab_size=261)
    write_byte_tokenizer(tmp_path)
    engine = Engine(model, tokenizer=Tokenizer.from_dir(tmp_path), max_memory="32MiB", max_num_seqs=3,
                    max_num_batched_tokens=3, max_model_len=96, block_size=16, compile_decode=True)
    compiled = engine.runner.compiled
    compiled._stack = _no_torch_compile
    assert compiled.aot_step(engine.runner.cache) is not None
    partial = []
    sample = engine.runner._sample

    def watched(batch, hidden, logits=None, argmax=None):
        if logits is not None:
            partial.append(len(batch.logits_indices) < logits.shape[0])
        return sample(batch, hidden, logits, argmax)

    engine.runner._sample = watched
    _assert_greedy_like_eager(engine, model, 6, (2, 3, 9), (12, 10, 5))
    assert any(partial)


def _assert_greedy_like_eager(engine, model, seed: int, prompt_lens: tuple, lengths: tuple) -> None:
    """Random prompts of `prompt_lens` tokens through `engine` (greedy, `lengths` new tokens each) give the tokens
    of the plain eager loop."""
    from qwen3next.engine.sampling import SamplingParams
    from qwen3next.model.generate import generate_tokens

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in prompt_lens]
    reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, lengths)]
    while engine.step():
        pass
    for r, p, n in zip(reqs, prompts, lengths):
        assert r.output().token_ids == list(generate_tokens(model, p, n))


def test_one_library_per_block_size_and_dtype_not_per_pool_size():
    from qwen3next.engine.compiled import layout_key

    model = make_model("base")

    def cache(slots, blocks, block_size, dtype=torch.float32, kv_dtype=None):
        return HybridCache(model.config, num_slots=slots, num_blocks=blocks, block_size=block_size, dtype=dtype,
                           layout=model.cache_layout(include_mtp=False), kv_dtype=kv_dtype)

    assert layout_key(cache(2, 4, 4)) == layout_key(cache(5, 9, 4))  # sizes are dynamic dimensions
    assert layout_key(cache(2, 4, 4)) != layout_key(cache(2, 4, 8))  # the block size is in the row arithmetic
    assert layout_key(cache(2, 4, 4)) != layout_key(cache(2, 4, 4, torch.bfloat16))
    assert layout_key(cache(2, 4, 4)) != layout_key(cache(2, 4, 4, kv_dtype=torch.float16))  # --kv-cache-dtype
    assert package_path(model, cache(2, 4, 4)) != package_path(model, cache(2, 4, 4, kv_dtype=torch.float16))
    assert package_path(model, cache(2, 4, 4)) != package_path(model, cache(2, 4, 8))
    assert package_path(model, cache(2, 4, 4)) == package_path(model, cache(5, 9, 4))


def test_the_package_key_covers_what_the_trace_depends_on():
    """Weight strides, non-tensor module state (the int4 weight layout), the thread mode and the switches each give
    another package (a package reused across them computed wrong hidden states, found in review)."""
    from qwen3next import kernels
    from qwen3next.engine.compiled import layout_key
    from qwen3next.ops.dispatch import set_threshold
    from qwen3next.quant.quantize import quantize_model

    model = make_model("base")
    cache = _cache(model, 2, 4)
    base = package_path(model, cache)
    strided = make_model("base")
    w = strided.model.embed_tokens.weight
    strided.model.embed_tokens.weight = torch.nn.Parameter(w.detach().t().contiguous().t())  # same values, strides
    assert package_path(strided, cache) != base
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two_threads = (package_path(model, cache), layout_key(cache))
    finally:
        torch.set_num_threads(threads)
    assert two_threads[0] != base and two_threads[1] != layout_key(cache)
    key = layout_key(cache)
    previous = set_threshold("native_moe", 4)
    try:
        assert layout_key(cache) != key and package_path(model, cache) != base
    finally:
        set_threshold("native_moe", previous)
    if kernels.available():  # int4 weights in the kernel layout or not: a module attribute the trace branches on
        sizes = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 64,
                 "shared_expert_intermediate_size": 64}
        on = quantize_model(make_model("base", **sizes), 4, group_size=64)
        was = kernels.set_enabled(False)
        try:
            off = quantize_model(make_model("base", **sizes), 4, group_size=64)  # torch's int4 layout
        finally:
            kernels.set_enabled(was)
        int4_cache = _cache(on, 2, 4)
        assert package_path(on, int4_cache) != package_path(off, int4_cache)


def test_the_package_key_covers_the_draft_vocabularys_source(monkeypatch):
    """The drafting program traces DraftVocabHead (engine/draft_vocab.py): a change to that file is another package."""
    from pathlib import Path

    model = make_model("base")
    cache = _cache(model, 2, 4)
    base = package_path(model, cache)
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: read_bytes(p) + (b"#" if p.name == "draft_vocab.py" else b""))
    assert package_path(model, cache) != base
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert package_path(model, cache) == base


def test_models_the_step_cannot_serve_are_refused_before_tracing(aot_on):
    model = make_model("base", dtype=torch.bfloat16)
    cache = HybridCache(model.config, num_slots=2, num_blocks=4, block_size=4, dtype=torch.bfloat16,
                        layout=model.cache_layout(include_mtp=False))
    with pytest.raises(AOTStepError, match=r"needs an fp32 model and the native kernels \(got torch.bfloat16"):
        AOTDecodeStep(model, cache)
    assert not any(aot_on.glob("*.tmp*"))  # nothing was exported or compiled


def test_aot_step_switched_off_stays_on_torch_compile(aot_dir, monkeypatch):
    monkeypatch.setenv("QWEN3NEXT_AOT_CACHE", str(aot_dir))
    model = make_model("base")
    previous = set_aot_decode(False)
    try:
        assert CompiledDecoder(model).aot_step(_cache(model, 2, 4)) is None
    finally:
        set_aot_decode(previous)


def test_a_corrupt_cached_package_is_a_clear_error_and_removed(aot_on):
    model = make_model("base")
    cache = _cache(model, 2, 4)
    path = package_path(model, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a package")
    with pytest.raises(AOTStepError, match="loading the ahead-of-time decode step failed"):
        AOTDecodeStep(model, cache)
    assert not path.exists()  # the next build compiles a fresh one


def test_unusable_cache_dir_warns_and_falls_back(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QWEN3NEXT_AOT_CACHE", str(blocker / "aot"))
    previous = set_aot_decode(True)
    try:
        model = make_model("base")
        decoder = CompiledDecoder(model)
        with pytest.warns(RuntimeWarning, match="stay on torch.compile"):
            assert decoder.aot_step(_cache(model, 2, 4)) is None
        assert decoder.aot_step(_cache(model, 2, 4)) is None  # decided once: no second attempt, no second warning
    finally:
        set_aot_decode(previous)


def _spec_cache(model, num_slots: int, num_blocks: int) -> HybridCache:
    return HybridCache(model.config, num_slots=num_slots, num_blocks=num_blocks, block_size=16,
                       layout=model.cache_layout(include_mtp=True))


@needs_compiler
def test_aot_verification_and_drafting_match_the_eager_verification_and_mtp_head(aot_on):
    """The speculative programs (T = 3 tokens per sequence, K = 2 drafts) against the eager model on a copy of the
    cache: hidden states, every captured DeltaNet state, the K/V rows written; then commit + MTP drafting with
    different accepted counts per sequence: the committed states, the MTP K/V rows and the drafts."""
    from qwen3next.engine.aot_step import AOTDraftStep, AOTVerifyStep

    model = make_model("mlp_only", vocab_size=261)
    cache = _spec_cache(model, num_slots=5, num_blocks=12)
    gen = torch.Generator().manual_seed(3)
    for pool in _pools(cache):
        pool.copy_(torch.randn(pool.shape, generator=gen) * 0.5)
    eager_cache = _spec_cache(model, num_slots=5, num_blocks=12)
    for a, b in zip(_pools(eager_cache), _pools(cache)):
        a.copy_(b)
    T, K = 3, 2
    verify, draft = AOTVerifyStep(model, cache, T=T), AOTDraftStep(model, cache, T=T, K=K)
    ctx_lens, slots, tables = [14, 30], [3, 1], [[7, 2], [0, 5, 9]]  # the second one's drafts cross a block
    tokens = torch.randint(0, 261, (2 * T,), generator=gen)
    with torch.no_grad():
        hidden, captured, logits, argmax = verify.run(tokens, BatchInfo([T] * 2, ctx_lens, slots, tables,
                                                                capture_states=True), cache)
        ctx = model.context(BatchInfo([T] * 2, ctx_lens, slots, tables, capture_states=True), eager_cache)
        ref = model.hidden_states(tokens, ctx)
        assert (hidden - ref).abs().max() < 1e-5
        assert logits.shape == (2 * T, 261) and (logits - model.lm_head(ref)).abs().max() < 1e-5
        assert torch.equal(argmax, logits.argmax(-1))
        assert len(captured) == len(ctx.captured) > 0
        for key, states in zip(verify.state_keys, captured):
            assert (states - ctx.captured[key]).abs().max() < 1e-5
        for a, b in zip(_pools(cache), _pools(eager_cache)):
            assert (a - b).abs().max() < 1e-5

        keep, bonus = [2, 3], [17, 200]
        info = BatchInfo([T] * 2, ctx_lens, slots, tables)
        assert draft.handles(info, keep)
        drafts = draft.run(hidden, tokens, bonus, keep, info, captured, cache)
        ctx.commit_captured(keep)
        nxt = torch.cat([tokens.view(2, T)[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1)
        for b in range(2):
            nxt[b, keep[b] - 1] = bonus[b]
        h = model.mtp_hidden(ref, nxt.reshape(-1), model.context(info, eager_cache)).view(2, T, -1)
        h = h[torch.arange(2), torch.tensor(keep) - 1]
        d = model.lm_head(h).argmax(-1)
        expected = [d]
        for j in range(1, K):
            step = BatchInfo([1, 1], [c + n - 1 + j for c, n in zip(ctx_lens, keep)], slots, tables)
            h = model.mtp_hidden(h, d, model.context(step, eager_cache))
            d = model.lm_head(h).argmax(-1)
            expected.append(d)
        assert drafts.tolist() == torch.stack(expected, dim=1).tolist()
        for a, b in zip(_pools(cache), _pools(eager_cache)):  # committed states, MTP K/V
            assert (a - b).abs().max() < 1e-5
        # a sequence whose blocks end before its lookahead position: not this program's step
        assert not draft.handles(BatchInfo([T], [29], [1], [[0, 5]]), [3])


@needs_compiler
def test_engine_speculative_steps_take_the_aot_programs_and_decode_exactly_like_plain(aot_on, tmp_path):
    """`Engine(compile_decode=True, speculative_config=k=2)`: uniform verifications and their drafting run through
    the ahead-of-time programs, and greedy tokens equal plain eager decoding's; so they do when every other
    drafting falls back to the eager commit and MTP head after an ahead-of-time verification."""
    from qwen3next.engine import aot_step
    from qwen3next.engine.llm import Engine
    from qwen3next.tokenizer import Tokenizer

    model = make_model("mlp_only", vocab_size=261)
    write_byte_tokenizer(tmp_path)
    engine = Engine(model, tokenizer=Tokenizer.from_dir(tmp_path), max_memory="32MiB", max_num_seqs=3,
                    max_model_len=96, block_size=16, compile_decode=True,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 2, "adaptive": False})
    compiled = engine.runner.compiled
    compiled._stack = _no_torch_compile
    compiled._mtp = _no_torch_compile
    calls = {"verify": 0, "draft": 0}
    for cls, kind in ((aot_step.AOTVerifyStep, "verify"), (aot_step.AOTDraftStep, "draft")):
        program = compiled._aot_program(cls, engine.runner.cache, T=3, **({"K": 2} if kind == "draft" else {}))
        run = program.run

        def counted(*args, _run=run, _kind=kind):
            calls[_kind] += 1
            return _run(*args)

        program.run = counted
    _assert_greedy_like_eager(engine, model, 4, (5, 23, 11), (12, 17, 9))
    assert calls["verify"] > 0 and calls["draft"] > 0

    draft = compiled.aot_draft(engine.runner.cache)
    handles, declined = draft.handles, []

    def every_other(batch, keep):  # the steps a grammar or missing lookahead blocks keep off the program
        declined.append(len(declined) % 2 == 0)
        return not declined[-1] and handles(batch, keep)

    draft.handles = every_other
    verified = calls["verify"]
    _assert_greedy_like_eager(engine, model, 5, (7, 19), (15, 11))
    assert calls["verify"] > verified and any(declined)


@needs_compiler
def test_speculative_engine_runs_steps_without_drafting_through_the_aot_runs(aot_on, tmp_path):
    """The steps a compiled speculative engine's policy gives no drafts run as multi-step runs through the
    ahead-of-time step, keeping its hidden states for the MTP head: its K/V once drafting resumes equals that of
    drafting at every step (eager), greedy tokens equal plain decoding's (test_speculative.py)."""
    from test_speculative import multi_step_keeps_the_mtp_gap

    from qwen3next.tokenizer import Tokenizer

    model = make_model("mlp_only", vocab_size=261)
    write_byte_tokenizer(tmp_path)
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(21)).tolist()
    multi_step_keeps_the_mtp_gap(model, Tokenizer.from_dir(tmp_path), prompt, compiled=True)


@needs_compiler
def test_aot_drafting_with_a_draft_vocabulary(aot_on, tmp_path):
    """speculative_token_map with the ahead-of-time programs: the drafting program is built with the map's head
    (its own package: the head's shape is in the key), its drafts are map tokens, and greedy tokens equal plain
    eager decoding's."""
    from qwen3next.engine import aot_step
    from qwen3next.engine.draft_vocab import DraftVocabHead
    from qwen3next.engine.llm import Engine
    from qwen3next.tokenizer import Tokenizer

    model = make_model("mlp_only", vocab_size=261)
    write_byte_tokenizer(tmp_path)
    ids = list(range(0, 261, 3))
    (tmp_path / "map.json").write_text(str(ids))
    engine = Engine(model, tokenizer=Tokenizer.from_dir(tmp_path), max_memory="32MiB", max_num_seqs=3,
                    max_model_len=96, block_size=16, compile_decode=True,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 2, "adaptive": False,
                                        "speculative_token_map": str(tmp_path / "map.json")})
    compiled = engine.runner.compiled
    assert isinstance(compiled.draft_head, DraftVocabHead)
    program = compiled._aot_program(aot_step.AOTDraftStep, engine.runner.cache, T=3, K=2)
    full = package_path(model, engine.runner.cache, "draft", 3, 2, model.lm_head, engine.runner.draft_mtp)
    assert package_path(model, engine.runner.cache, "draft", 3, 2, compiled.draft_head,
                        engine.runner.draft_mtp) != full
    drafts, run = [], program.run
    program.run = lambda *args: (lambda d: drafts.append(d) or d)(run(*args))
    _assert_greedy_like_eager(engine, model, 4, (5, 23, 11), (12, 17, 9))
    assert drafts and set(torch.cat(drafts).flatten().tolist()) <= set(ids)
