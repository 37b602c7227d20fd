"""The engine end to end on a tiny random model with a real byte-level tokenizer.json."""

from __future__ import annotations

import threading

import pytest
import torch

from qwen3next.engine.llm import LLM, Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.model.generate import generate_tokens
from qwen3next.tokenizer import Tokenizer
from tiny_models import make_model, write_byte_tokenizer

VOCAB = 261


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_engine")
    model = make_model("base", vocab_size=VOCAB, max_position_embeddings=1024)
    model.save_pretrained(d)
    write_byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    from qwen3next.checkpoint import load_model

    return load_model(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt, max_tokens):
    return list(generate_tokens(model, prompt, max_tokens))


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("chunked,chunk", [(True, 16), (True, 512), (False, 512)])
def test_greedy_matches_naive_loop(model, tokenizer, chunked, chunk):
    prompts = prompts_of([3, 150, 40, 1, 77])
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=4, max_num_batched_tokens=512,
                    max_model_len=512, chunked_prefill=chunked, prefill_chunk_size=chunk, block_size=16)
    reqs = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.step():
        pass
    for p, r in zip(prompts, reqs):
        assert r.done.is_set()
        assert r.output().token_ids == reference(model, p, 12)
        assert r.output().finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks
    assert engine.block_manager.num_free_slots == engine.plan.num_slots


def test_arrivals_mid_flight_and_batch_independence(model, tokenizer):
    prompts = prompts_of([20, 90, 5, 33], seed=1)
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=3, max_num_batched_tokens=64,
                    max_model_len=512, prefill_chunk_size=24, block_size=16)
    reqs = [engine.add_request(prompts[0], GREEDY)]
    for step in range(200):
        if step in (2, 5, 9):
            reqs.append(engine.add_request(prompts[len(reqs)], GREEDY))
        if not engine.step() and len(reqs) == len(prompts):
            break
    for p, r in zip(prompts, reqs):
        assert r.output().token_ids == reference(model, p, 12)


def test_preemption_under_a_tiny_pool_keeps_outputs(model, tokenizer):
    prompts = prompts_of([60, 61, 62], seed=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    # KV room for ~2 sequences of 100 tokens: the third forces preemption and recompute.
    kv_token = model.config.kv_bytes_per_token(4)
    state = model.config.state_bytes_per_sequence(4, 4)
    engine = Engine(model, tokenizer=tokenizer, max_memory=3 * state + 14 * 16 * kv_token, max_num_seqs=3,
                    max_num_batched_tokens=256, max_model_len=100, block_size=16)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.step():
        pass
    assert engine.scheduler.num_preemptions > 0
    for p, r in zip(prompts, reqs):
        assert r.output().token_ids == reference(model, p, 30)
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent(model, tokenizer):
    p = prompts_of([25], seed=3)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True, n=2)
    alone = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=256)
    r1 = alone.add_request(p, params)
    while alone.step():
        pass
    crowded = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=256)
    for q in prompts_of([7, 50, 3], seed=4):
        crowded.add_request(q, SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True))
    r2 = crowded.add_request(p, params)
    while crowded.step():
        pass
    a, b = r1.output(), r2.output()
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids  # the n samples differ


def test_stop_strings_split_across_tokens_are_not_leaked(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=256)
    prompt = prompts_of([10], seed=5)[0]
    free = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while engine.step():
        pass
    text = free.output().text
    assert len(text) >= 6
    stop = text[3:6]  # bytes 3..5: spans several tokens of the byte tokenizer
    stopped = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    while engine.step():
        pass
    out = stopped.output()
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert stop not in out.text
    assert out.outputs[0].stop_reason == stop


def test_eos_and_stop_token_ids(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=256)
    prompt = prompts_of([12], seed=6)[0]
    free = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    while engine.step():
        pass
    toks = free.output().token_ids
    stop_tok = toks[4]
    r = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]))
    while engine.step():
        pass
    out = r.output()
    first = toks.index(stop_tok)
    assert out.token_ids == toks[: first + 1] and out.finish_reason == "stop"


def test_logprobs_match_model(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=256)
    prompt = prompts_of([9], seed=7)[0]
    r = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True))
    while engine.step():
        pass
    out = r.output().outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    lp = torch.log_softmax(logits.float(), -1)
    first = out.logprobs[0]
    assert first["token_id"] == int(lp.argmax())
    assert abs(first["logprob"] - float(lp.max())) < 1e-4
    assert [t for t, _ in first["top"]] == lp.topk(4).indices.tolist()


def test_greedy_shortcut_leaves_penalties_and_logprobs_to_the_sampler(model, tokenizer, monkeypatch):
    """Plain greedy rows take the logits' argmax without the sampler (runner.plain_greedy); greedy rows with a
    repetition penalty or logprobs, batched with them, still go through it: every output equals a run where every
    row takes the sampler, and the penalised row differs from plain greedy (the penalty was applied)."""
    from qwen3next.engine import runner

    prompt = prompts_of([30], seed=11)[0]
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # alone for its last 8 steps: the shortcut
    kinds = [plain, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=3.0),
             SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2), plain]
    shortcut = []
    plain_greedy = runner.plain_greedy

    def run():  # one step per schedule: multi-step runs take the argmax without the runner's sampling path
        engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=4, max_model_len=256,
                        num_scheduler_steps=1)
        reqs = [engine.add_request(prompt, p) for p in kinds]
        while engine.step():
            pass
        return [r.output().outputs[0] for r in reqs]

    monkeypatch.setattr(runner, "plain_greedy", lambda seqs: shortcut.append(plain_greedy(seqs)) or shortcut[-1])
    fast = run()
    assert any(shortcut) and not all(shortcut)
    monkeypatch.setattr(runner, "plain_greedy", lambda seqs: False)
    slow = run()
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
    assert fast[2].logprobs == slow[2].logprobs and fast[2].logprobs
    assert fast[0].token_ids == fast[3].token_ids == reference(model, prompt, 24)
    assert fast[1].token_ids != fast[0].token_ids[:16]  # the penalty was applied


def test_multi_step_decoding_gives_the_tokens_of_single_steps(model, tokenizer):
    """num_scheduler_steps=8 (greedy decode steps in runs, the scheduler only between runs) against 1: greedy
    requests ending by max_tokens, by a stop token inside a run and by a stop string, a seeded sampled request (the
    batch takes one step per schedule while it runs, runs again after it), then a follow-up that resumes from the
    state a finished run left in the prefix cache: the same tokens, text and finish reasons, and the engine did take
    runs of several steps."""
    prompts = prompts_of([5, 17, 9, 30], seed=3)
    free = reference(model, prompts[0], 40)
    plain = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=256, num_scheduler_steps=1)
    r = plain.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while plain.step():
        pass
    text = r.output().text
    kinds = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free[13]]),
             SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[text[21:24]]),
             SamplingParams(temperature=0.8, seed=5, max_tokens=10),
             SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]
    on = [prompts[0], prompts[0], prompts[1], prompts[2], prompts[3]]

    def run(steps):
        engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=8, max_model_len=256,
                        num_scheduler_steps=steps)
        engine.scheduler.config.multi_step_seconds = 60.0  # runs bounded by the steps asked for, not by timing
        runs, execute = [], engine.runner.execute
        engine.runner.execute = lambda batch: runs.append(batch.num_steps) or execute(batch)
        reqs = [engine.add_request(p, k) for p, k in zip(on, kinds)]
        while engine.step():
            pass
        outs = [r.output() for r in reqs]
        follow = engine.add_request(prompts[0] + outs[0].token_ids,
                                    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        while engine.step():
            pass
        outs.append(follow.output())
        return [(o.token_ids, o.text, o.finish_reason) for o in outs], outs[-1].num_cached_tokens, runs

    single, cached_single, runs_single = run(1)
    multi, cached_multi, runs_multi = run(8)
    assert multi == single
    assert single[0][0] == free and single[1][0] == free[:free.index(free[13]) + 1]
    assert single[2][2] == "stop" and len(single[2][0]) < 40
    assert cached_multi == cached_single == len(prompts[0]) + 40 - 1  # the state after the first request's run
    assert set(runs_single) == {1} and max(runs_multi) == 8


def test_bad_requests_are_rejected_clearly(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(64)), GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([5, VOCAB + 3], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("", GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_memory"):
        Engine(model, tokenizer=tokenizer, max_memory="lots")
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, tokenizer=tokenizer, max_memory=1000, max_model_len=64)


def test_llm_builds_its_engine_on_the_thread_that_steps_it(model_dir, model, monkeypatch):
    """LLM's engine (the model load, quantization, compilation) is built on the engine thread, whose OpenMP team then
    stays the process's only one; a constructor error still reaches the caller."""
    built_on = []
    init = Engine.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(threading.current_thread().name)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", recording_init)
    with LLM(model_dir, max_memory="64MiB", max_model_len=256) as llm:
        assert built_on == [llm._thread.name] == ["qwen3next-engine"]
        prompt = prompts_of([9], seed=3)[0]
        assert llm.generate([prompt], GREEDY)[0].token_ids == reference(model, prompt, 12)
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLM(model_dir, max_memory="64MiB", num_scheduler_steps=0)


def test_threaded_llm_generate_stream_abort(model_dir, model):
    with LLM(model_dir, max_memory="64MiB", max_model_len=512, max_num_seqs=8) as llm:
        prompts = prompts_of([5, 80, 17, 40, 2, 60], seed=8)
        results: dict[int, list[int]] = {}

        def client(i):
            results[i] = llm.generate([prompts[i]], GREEDY)[0].token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, p in enumerate(prompts):
            assert results[i] == reference(model, p, 12)
        # streaming reassembles to the non-streamed text
        text = "".join(llm.stream("hello there", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
        assert text == llm.generate("hello there", SamplingParams(temperature=0, max_tokens=20,
                                                                  ignore_eos=True))[0].text
        # abort mid-flight frees everything
        h = llm.submit(prompts[1], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        next(h.events())
        assert h.abort()
        assert h.result(timeout=30).finish_reason == "abort"
        stats = llm.stats()
        assert stats["free_blocks"] == stats["total_blocks"] and stats["free_slots"] == stats["total_slots"]
