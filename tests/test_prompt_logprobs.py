# ruff: noqa: F811 -- the tiny engine model's fixtures come from test_engine_llm and are used as arguments
"""Prompt logprobs (`SamplingParams(prompt_logprobs=N)`, vLLM's semantics): equal to the log-softmax of one plain
forward over the whole prompt, whatever the prefill chunking, with top-N and ranks, n > 1, speculative decoding,
preemption, aborts and `max_tokens=0`; the scheduler's spans cover every prompt position once."""

from __future__ import annotations

import pytest
import torch
from test_engine_llm import model, model_dir, prompts_of, reference, tokenizer  # noqa: F401 (shared fixtures)
from test_engine_scheduler import check_invariants, make, random_requests

from qwen3next.engine.llm import LLM, Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.engine.sequence import FinishReason, Sequence
from qwen3next.model import qwen3_next as model_module

TOL = 1e-4  # fp32 rounding: chunked prefill + paged cache vs one forward


def full_forward_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of the logits of one plain forward (no cache) over the prompt."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).float(), dim=-1)[0]


def assert_prompt_logprobs(got, model, tokenizer, prompt: list[int], top_n: int, upto: int | None = None) -> None:
    """`got` is vLLM's list: None, then per prompt token a dict token id -> Logprob holding the token (with its
    logprob given the tokens before it and its rank) and the top `top_n` tokens, ranks 1..top_n."""
    ref = full_forward_logprobs(model, prompt)
    upto = len(prompt) if upto is None else upto
    assert len(got) == upto and got[0] is None
    for p in range(1, upto):
        row, tok, d = ref[p - 1], prompt[p], got[p]
        assert next(iter(d)) == tok, "the prompt token comes first"
        assert abs(d[tok].logprob - row[tok].item()) < TOL
        # rank 1 = the most likely; only tokens within rounding of it may be counted either way
        assert int((row > row[tok] + TOL).sum()) + 1 <= d[tok].rank <= int((row >= row[tok] - TOL).sum())
        top = {t: e for t, e in d.items() if t != tok or e.rank <= top_n}
        assert len(top) == top_n
        others = sorted((e.rank, e.logprob, t) for t, e in top.items() if t != tok)
        assert len({r for r, _, _ in others}) == len(others) and all(1 <= r <= top_n for r, _, _ in others)
        ref_top = row.topk(top_n).values.tolist() if top_n else []
        assert sorted((e.logprob for e in top.values()), reverse=True) == pytest.approx(ref_top, abs=TOL)
        for t, e in d.items():
            assert abs(e.logprob - row[t].item()) < TOL
            assert e.decoded_token == tokenizer.decode([t])


def run(engine: Engine, prompts, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.step():
        pass
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks
    assert engine.block_manager.num_free_slots == engine.plan.num_slots
    return [r.output() for r in reqs]


OPTS = dict(max_memory="64MiB", max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256, block_size=16)


@pytest.mark.parametrize("chunk,top_n,piece", [(16, 0, 256), (16, 5, 7), (512, 3, 256)])
def test_prompt_logprobs_equal_log_softmax_of_a_full_forward(model, tokenizer, monkeypatch, chunk, top_n, piece):
    """Prompts of 1, 2, 37 and 70 tokens in one batch with a request that asks for none, chunks of 16 (a prompt
    spans several steps, the next chunk's first token scores the last position) or whole prompts; the lm_head
    pieces of 7 rows split chunks. Generation is untouched."""
    monkeypatch.setattr(model_module, "LOGPROB_ROWS", piece)
    prompts = prompts_of([1, 2, 37, 70, 50], seed=4)
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=top_n)] * 4
    params.append(SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    outs = run(Engine(model, tokenizer=tokenizer, prefill_chunk_size=chunk, **OPTS), prompts, params)
    for p, o in zip(prompts[:4], outs):
        assert_prompt_logprobs(o.prompt_logprobs, model, tokenizer, p, top_n)
    assert outs[4].prompt_logprobs is None
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference(model, p, 4)


def test_max_tokens_zero_prefills_the_prompt_only(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, prefill_chunk_size=16, **{**OPTS, "max_model_len": 64})
    prompts = prompts_of([64, 30, 5], seed=5)  # 64 = max_model_len: allowed when nothing is generated
    params = [SamplingParams(max_tokens=0, prompt_logprobs=2), SamplingParams(max_tokens=0, prompt_logprobs=0),
              SamplingParams(max_tokens=0)]
    outs = run(engine, prompts, params)
    for o in outs:
        assert o.finished and o.finish_reason == "length" and o.token_ids == [] and o.text == ""
        assert o.usage["completion_tokens"] == 0
    assert_prompt_logprobs(outs[0].prompt_logprobs, model, tokenizer, prompts[0], 2)
    assert_prompt_logprobs(outs[1].prompt_logprobs, model, tokenizer, prompts[1], 0)
    assert outs[2].prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(prompts[0], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    # n > 1 would prefill the same prompt n times for nothing: refused, naming both parameters
    with pytest.raises(ValueError, match=r"n must be 1 when max_tokens is 0 .*got n=3"):
        SamplingParams(max_tokens=0, n=3, prompt_logprobs=1)


def test_n_samples_compute_the_prompt_logprobs_once(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, prefill_chunk_size=16, **OPTS)
    prompt = prompts_of([45], seed=6)[0]
    out = run(engine, [prompt], SamplingParams(n=3, temperature=0.9, seed=3, max_tokens=5, ignore_eos=True,
                                               prompt_logprobs=4, logprobs=2))[0]
    assert_prompt_logprobs(out.prompt_logprobs, model, tokenizer, prompt, 4)
    assert [len(o.token_ids) for o in out.outputs] == [5, 5, 5]
    assert all(len(o.logprobs) == 5 for o in out.outputs)


def test_prompt_logprobs_with_speculative_decoding(model, tokenizer):
    """MTP drafting and verification in the same steps as prefill chunks that score their prompt."""
    prompts = prompts_of([70, 3, 40, 21], seed=7)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=3)
    plain = run(Engine(model, tokenizer=tokenizer, prefill_chunk_size=16, **OPTS), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, prefill_chunk_size=16,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 2, "adaptive": False}, **OPTS)
    reqs = [engine.add_request(prompts[0], params)]
    for step in range(1000):  # later arrivals prefill while the first one verifies drafts
        if step in (5, 6, 7):
            reqs.append(engine.add_request(prompts[step - 4], params))
        if not engine.step() and len(reqs) == len(prompts):
            break
    assert engine.spec_stats.num_draft_tokens > 0
    for p, r, o in zip(prompts, reqs, plain):
        assert r.output().token_ids == o.token_ids
        assert_prompt_logprobs(r.output().prompt_logprobs, model, tokenizer, p, 3)


def test_preemption_does_not_repeat_prompt_logprobs(model, tokenizer):
    prompts = prompts_of([60, 61, 62], seed=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_logprobs=1)
    kv_token = model.config.kv_bytes_per_token(4)
    state = model.config.state_bytes_per_sequence(4, 4)
    engine = Engine(model, tokenizer=tokenizer, max_memory=3 * state + 14 * 16 * kv_token, max_num_seqs=3,
                    max_num_batched_tokens=256, max_model_len=100, block_size=16, prefill_chunk_size=24)
    outs = run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference(model, p, 30)
        assert_prompt_logprobs(o.prompt_logprobs, model, tokenizer, p, 1)


def test_abort_mid_prefill_keeps_the_computed_prefix(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, prefill_chunk_size=16, **OPTS)
    prompt = prompts_of([70], seed=8)[0]
    req = engine.add_request(prompt, SamplingParams(max_tokens=3, prompt_logprobs=2))
    other = engine.add_request(prompt[:20], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                           prompt_logprobs=2))
    engine.step()
    engine.step()
    assert engine.abort(req.request_id)
    while engine.step():
        pass
    out = req.output()
    assert out.finish_reason == "abort"
    assert_prompt_logprobs(out.prompt_logprobs, model, tokenizer, prompt, 2, upto=33)  # two chunks of 16
    assert_prompt_logprobs(other.output().prompt_logprobs, model, tokenizer, prompt[:20], 2)
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks


def test_stream_carries_the_prompt_logprobs_on_sample_zeros_first_event(model_dir, model, tokenizer):
    prompt = prompts_of([40], seed=9)[0]
    with LLM(model_dir, max_memory="64MiB", max_model_len=256, prefill_chunk_size=16) as llm:
        handle = llm.submit(prompt, SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True,
                                                   prompt_logprobs=2))
        events = list(handle.events(timeout=60))
    carrying = [k for k, ev in enumerate(events) if ev.prompt_logprobs is not None]
    assert len(carrying) == 1
    ev = events[carrying[0]]
    assert ev.index == 0 and not any(e.index == 0 for e in events[:carrying[0]])
    assert_prompt_logprobs(ev.prompt_logprobs, model, tokenizer, prompt, 2)
    assert handle.result().prompt_logprobs == ev.prompt_logprobs


# ---- the scheduler's decision, on a fake model ------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_scheduler_spans_cover_each_prompt_position_once_across_preemptions(chunked):
    """A tiny pool that preempts (mid-prefill too): over the whole run, the spans of each sequence that asks for
    prompt logprobs cover positions 0 .. P-2 exactly once, their rows are those positions' flat indices and their
    targets the next prompt tokens; max_tokens=0 sequences end with nothing generated."""
    sched, runner = make(num_blocks=12, block_size=4, num_slots=6, max_num_seqs=6, max_num_batched_tokens=48,
                         max_model_len=48, chunked_prefill=chunked, prefill_chunk_size=5)
    seqs = []
    for i, (prompt, max_tokens) in enumerate(random_requests(20, seed=12, max_prompt=25, max_out=20)):
        params = SamplingParams(max_tokens=max_tokens if i % 4 else 0, ignore_eos=True,
                                prompt_logprobs=1 if i % 2 == 0 else None)
        seqs.append(Sequence(f"r{i}", prompt, params, sample_index=0 if i % 3 else 1))
        sched.add(seqs[-1])
    scored: dict[str, list[int]] = {s.request_id: [] for s in seqs}
    for _ in range(10_000):
        batch = sched.schedule()
        check_invariants(sched, batch)
        if batch is None:
            break
        rows = iter(zip(batch.prompt_logprob_rows, batch.prompt_logprob_targets, strict=True))
        for b, first, last in batch.prompt_logprob_spans:
            e = batch.entries[b]
            assert e.seq.wants_prompt_logprobs and e.context_len <= first < last <= e.context_len + e.num_new_tokens
            for p in range(first, last):
                row, target = next(rows)
                assert batch.positions[row] == p and batch.input_ids[row] == e.seq.prompt_token_ids[p]
                assert target == e.seq.prompt_token_ids[p + 1]
                scored[e.seq.request_id].append(p)
        assert next(rows, None) is None
        sched.update(batch, runner.step(batch))
    else:
        raise AssertionError("did not finish")
    assert sched.num_preemptions > 0
    for s in seqs:
        want = list(range(s.num_prompt_tokens - 1)) if s.wants_prompt_logprobs else []
        assert scored[s.request_id] == want, s.request_id
        if s.params.max_tokens == 0:
            assert s.finish_reason == FinishReason.LENGTH and s.output_token_ids == []
        else:
            assert s.num_output_tokens == min(s.params.max_tokens, 48 - s.num_prompt_tokens)
