# ruff: noqa: F811 -- the tiny engine model's fixtures come from test_engine_llm and are used as arguments
"""MTP speculative decoding through the engine: exact (greedy and seeded outputs token-identical to plain decoding,
sampling distributed as the target), with chunked prefill, preemption, stop rules, logprobs, n > 1 and aborts; the
draft-length policy; the configuration's errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_engine_llm import VOCAB, model, model_dir, prompts_of, tokenizer  # noqa: F401 (shared fixtures)

from qwen3next import kernels
from qwen3next.engine import runner as runner_module
from qwen3next.engine.llm import LLM, Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.engine.speculative import DraftLengthPolicy, SpecStats, SpeculativeConfig, accepted_run
from qwen3next.model.generate import generate_tokens
from qwen3next.quant.experts import QuantizedExperts
from qwen3next.quant.linear import Int8Linear
from qwen3next.quant.quantize import quantize_model
from tiny_models import make_model


def spec(k: int, adaptive: bool = False) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, "adaptive": adaptive}


def run(engine: Engine, prompts, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.step():
        pass
    return [r.output() for r in reqs]


def with_oracle_drafts(engine: Engine, oracle: dict[str, list[int]], corrupt: float, seed: int = 0) -> None:
    """Replace the MTP head's proposals by the plain run's own continuation (request id -> output tokens), a
    fraction `corrupt` of them changed: a random model's MTP head almost never guesses right, and the acceptance
    paths (long accepted runs, a stop inside one, max_tokens) need drafts that are often right."""
    rng = random.Random(seed)
    execute = engine.runner.execute

    def patched(batch):
        out = execute(batch)
        if out is not None and out.drafts:
            for j, seq in enumerate(batch.sampled_seqs):
                want = oracle.get(seq.request_id.split("#")[0], [])
                done = seq.num_output_tokens + len(out.tokens[j])
                drafts = want[done:done + len(out.drafts[j])]
                out.drafts[j] = [t if rng.random() >= corrupt else (t + 1) % VOCAB for t in drafts]
        return out

    engine.runner.execute = patched


# ---- exactness: greedy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,k", [("base", 1), ("base", 2), ("base", 3), ("base", 4), ("mlp_only", 3),
                                    ("yarn", 2)])
def test_greedy_with_mtp_is_token_identical_to_plain_decoding(model, tokenizer, name, k):
    """Prompts of several lengths in one batch, chunked prefill (chunks of 16), the real MTP head's drafts; odd
    configs (dense layers, head counts that are not powers of two, YaRN past the original context)."""
    if name != "base":
        model = make_model(name, vocab_size=VOCAB, max_position_embeddings=256)
    prompts = prompts_of([3, 70, 21, 1, 40], seed=k)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    opts = dict(max_memory="64MiB", max_num_seqs=4, max_model_len=256, prefill_chunk_size=16, block_size=16)
    plain = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, speculative_config=spec(k), **opts)
    got = run(engine, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert engine.spec_stats.num_draft_tokens > 0  # drafts were verified
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_with_mostly_right_drafts_stops_exactly_like_plain_decoding(model, tokenizer, k):
    """Long accepted runs: max_tokens is never passed, a stop token inside an accepted run ends the output there,
    stop strings and logprobs are those of plain decoding."""
    prompts = prompts_of([9, 30, 17], seed=10)
    base = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    opts = dict(max_memory="64MiB", max_num_seqs=4, max_model_len=256, block_size=16)
    plain = run(Engine(model, tokenizer=tokenizer, **opts), prompts, base)
    outs = [o.token_ids for o in plain]
    # stop at a token that plain decoding emits mid-way (a stop token), and at a decoded stop string
    stop_token = outs[0][11]
    text = tokenizer.decode(outs[2][:15])
    stop_str = text[-3:] if text[-3:].strip() else None
    params = [SamplingParams(temperature=0, max_tokens=29, ignore_eos=True, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=29, ignore_eos=True, stop=stop_str)]
    want = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, speculative_config=spec(k), **opts)
    with_oracle_drafts(engine, {f"req-{i}": o for i, o in enumerate(outs)}, corrupt=0.15)
    got = run(engine, prompts, params)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
        assert g.outputs[0].stop_reason == w.outputs[0].stop_reason
    assert len(got[1].token_ids) == 13
    for a, b in zip(got[1].outputs[0].logprobs, want[1].outputs[0].logprobs):
        assert a["token_id"] == b["token_id"] and math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4)
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
    stats = engine.spec_stats
    assert stats.acceptance_rate > 0.5 and stats.mean_accepted_length > 1.5  # the accepted-run paths ran
    assert got[0].acceptance_rate is not None


def test_greedy_with_mtp_survives_preemption(model, tokenizer):
    prompts = prompts_of([60, 61, 62], seed=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    kv_token = model.config.kv_bytes_per_token(4, include_mtp=True)
    state = model.config.state_bytes_per_sequence(4, 4)
    opts = dict(max_memory=3 * state + 14 * 16 * kv_token, max_num_seqs=3, max_num_batched_tokens=256,
                max_model_len=100, block_size=16)
    plain = run(Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_model_len=100), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, speculative_config=spec(3), **opts)
    with_oracle_drafts(engine, {f"req-{i}": o.token_ids for i, o in enumerate(plain)}, corrupt=0.2)
    got = run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks


def test_drafts_are_verified_while_other_requests_prefill(model, tokenizer):
    """Continuous batching: requests arrive while others decode, their prompts prefill in chunks of 8 in the same
    steps as the verifications (run as two forwards); outputs equal plain decoding's."""
    prompts = prompts_of([6, 11, 45, 37, 3], seed=12)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    opts = dict(max_memory="64MiB", max_num_seqs=5, max_model_len=256, prefill_chunk_size=8, block_size=16)
    want = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, speculative_config=spec(2), **opts)
    with_oracle_drafts(engine, {f"req-{i}": o.token_ids for i, o in enumerate(want)}, corrupt=0.2)
    mixed = []
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        if batch is not None and batch.has_drafts and not batch.is_decode_step:
            mixed.append(batch)
        return batch

    engine.scheduler.schedule = spy
    reqs = [engine.add_request(p, params, request_id=f"req-{i}") for i, p in enumerate(prompts[:2])]
    for i, p in enumerate(prompts[2:], start=2):  # each arrival after a few decode steps of the others
        for _ in range(3):
            engine.step()
        reqs.append(engine.add_request(p, params, request_id=f"req-{i}"))
    while engine.step():
        pass
    assert [r.output().token_ids for r in reqs] == [o.token_ids for o in want]
    assert mixed  # verifications did share steps with prefill chunks
    assert engine.spec_stats.num_accepted_tokens > 0


# ---- exactness: sampling -----------------------------------------------------------------------------------------


def test_seeded_sampling_with_mtp_gives_the_same_tokens_as_plain_decoding(model, tokenizer):
    """Each position is sampled with the stream plain decoding uses there, so seeded requests (penalties, top-k/p,
    min-p, n > 1) produce the very same tokens, whatever is accepted."""
    prompts = prompts_of([12, 33], seed=4)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_tokens=20, seed=7, ignore_eos=True, n=2),
              SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.3, max_tokens=20, seed=11, ignore_eos=True, logprobs=2)]
    opts = dict(max_memory="64MiB", max_num_seqs=4, max_model_len=256)
    plain = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    for corrupt in (0.0, 0.5):
        engine = Engine(model, tokenizer=tokenizer, speculative_config=spec(3), **opts)
        oracle = {f"req-{i}": o.outputs[0].token_ids for i, o in enumerate(plain)}
        with_oracle_drafts(engine, oracle, corrupt=corrupt)
        got = run(engine, prompts, params)
        for g, w in zip(got, plain):
            assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]
        assert engine.spec_stats.num_accepted_tokens > 0


def _verified_tokens_test(model, tokenizer, rule, samples=1500):
    """Chi-square p-value of the joint of the 2nd and 3rd sampled tokens (the first ones a verification decides;
    unseeded sampling), among samples whose first token is the most likely one, against the exact target
    distribution. The draft for the 2nd token is the target's most likely one, so it is accepted often."""
    prompt = prompts_of([6], seed=21)[0]
    temp = 0.15  # a random model's distributions are flat; sharpen them so that drafts are often right
    params = SamplingParams(temperature=temp, max_tokens=3, ignore_eos=True)

    def probs(ids):
        return torch.softmax(model(torch.tensor([ids]))[0, -1].float() / temp, -1)

    with torch.no_grad():
        p1 = probs(prompt)
        first = int(p1.argmax())
        p2 = probs(prompt + [first])
        joint = {}
        for t in torch.topk(p2, 3).indices.tolist():
            p3 = probs(prompt + [first, t])
            for u in torch.topk(p3, 2).indices.tolist():
                joint[(t, u)] = float(p2[t] * p3[u])
        # the draft for the 2nd token: the target's most likely one after the 1st
        draft_of = {t: int(probs(prompt + [t]).argmax()) for t in torch.topk(p1, 4).indices.tolist()}
    engine = Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=16, max_model_len=64,
                    speculative_config=spec(1))
    execute = engine.runner.execute

    def patched(batch):
        out = execute(batch)
        if out is not None and out.drafts:
            out.drafts = [[draft_of.get(toks[-1], 0)] for toks in out.tokens]
        return out

    engine.runner.execute = patched
    saved = runner_module.accepted_run
    runner_module.accepted_run = rule
    try:
        # in waves of max_num_seqs: every request's 2nd token is decided by exactly one verification
        outs = [o.token_ids for _ in range(samples // 15) for o in run(engine, [prompt] * 15, params)]
    finally:
        runner_module.accepted_run = saved
    assert engine.spec_stats.num_drafts == samples and engine.spec_stats.num_accepted_tokens > samples // 10
    kept = [tuple(o[1:]) for o in outs if o[0] == first]
    assert len(kept) > samples // 10
    counts = {key: 0 for key in joint}
    other = 0
    for key in kept:
        if key in counts:
            counts[key] += 1
        else:
            other += 1
    n = len(kept)
    cells = [(counts[key], n * pr) for key, pr in joint.items()] + [(other, n * (1 - sum(joint.values())))]
    cells = [(obs, exp) for obs, exp in cells if exp > 0.5 or obs]
    stat = sum((obs - exp) ** 2 / exp for obs, exp in cells)
    return _chi2_sf(stat, len(cells) - 1)


def _chi2_sf(x: float, k: int) -> float:
    s, term, a = 0.0, 1.0 / (k / 2), k / 2
    for n in range(1, 500):
        s += term
        term *= (x / 2) / (a + n)
    lower = math.exp(-x / 2 + a * math.log(x / 2) - math.lgamma(a)) * s
    return max(0.0, 1.0 - lower)


def test_sampling_with_mtp_is_distributed_as_the_target_and_a_broken_rule_is_caught(model, tokenizer):
    assert _verified_tokens_test(model, tokenizer, accepted_run) > 1e-3

    def biased(drafts, targets):
        """Broken on purpose: also accepts a draft that the target rejected, half of the time."""
        out = []
        for d, t in zip(drafts, targets):
            if d != t and random.random() < 0.5:
                out.append(d)
                continue
            out.append(t)
            if d != t:
                return out
        return out + [targets[-1]]

    random.seed(0)
    assert _verified_tokens_test(model, tokenizer, biased) < 1e-3


# ---- engine features -----------------------------------------------------------------------------------------------


def test_abort_and_n_samples_with_mtp(model_dir):
    with LLM(model_dir, max_memory="64MiB", max_model_len=256, speculative_config=spec(2)) as llm:
        p = prompts_of([10], seed=5)[0]
        h = llm.submit(p, SamplingParams(temperature=0.8, max_tokens=200, ignore_eos=True, n=3, seed=3))
        events = h.events(timeout=60)
        next(events)
        assert h.abort()
        out = h.result(timeout=60)
        assert all(o.finish_reason == "abort" for o in out.outputs)
        r = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=2))[0]
        assert len(r.outputs) == 2 and r.outputs[0].token_ids == r.outputs[1].token_ids
        stats = llm.stats()
        assert stats["spec_draft_tokens"] >= stats["spec_accepted_tokens"] >= 0
        assert stats["free_blocks"] == stats["total_blocks"]


def test_speculative_config_errors(model, tokenizer):
    no_mtp = make_model("base", mtp=False, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"mtp\.\* weights"):
        Engine(no_mtp, tokenizer=tokenizer, speculative_config=spec(2))
    for bad, match in [({"method": "eagle"}, "method must be one of"),
                       ({"method": "mtp", "num_speculative_tokens": 5}, "num_speculative_tokens"),
                       ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "mtp", "draft": 1}, "unknown key 'draft'"),
                       ({"method": "mtp", "draft_head": "int4"}, "draft_head must be one of 'int8', 'target'"),
                       ({"num_speculative_tokens": 2}, '"method" is required'),
                       ("{not json", "not valid JSON"), ("[1]", "expected a JSON object")]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)
    cfg = SpeculativeConfig.parse('{"method": "qwen3_next_mtp", "num_speculative_tokens": 3}')
    assert cfg.num_speculative_tokens == 3 and cfg.adaptive
    quantized = quantize_model(make_model("base", vocab_size=VOCAB), 8)
    with pytest.raises(ValueError, match="draft_head 'int8' quantizes a float lm_head; this model's is Int8Linear"):
        Engine(quantized, tokenizer=tokenizer, speculative_config={**spec(2), "draft_head": "int8"})
    assert Engine(quantized, tokenizer=tokenizer, speculative_config=spec(2)).runner.draft_head is quantized.lm_head
    with pytest.raises(ValueError, match="draft_head 'int8' is not supported with tensor_parallel_size > 1"):
        Engine("no-such-dir", tensor_parallel_size=2, speculative_config={**spec(2), "draft_head": "int8"})


# ---- decisions (no model) ------------------------------------------------------------------------------------------


def test_accepted_run():
    assert accepted_run([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accepted_run([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accepted_run([5], [4, 1]) == [4]
    assert accepted_run([], [3]) == [3]
    with pytest.raises(ValueError, match="targets"):
        accepted_run([1, 2], [1, 2])


def test_draft_length_policy_picks_the_fastest_length_and_follows_changes():
    policy = DraftLengthPolicy(3, window=8, explore_every=10, min_samples=2, margin=0.0)
    # untimed lengths are tried first, longest first
    seen = []
    for _ in range(8):
        k = policy.choose(1)
        seen.append(k)
        policy.record_step(1, k, {0: 4.0, 1: 5.0, 2: 5.5, 3: 6.0}[k])
    assert seen == [3, 3, 2, 2, 1, 1, 0, 0]
    for _ in range(50):  # drafts accepted 90% of the time: 3 drafts pay (3.44 tokens per 6.0 vs 1 per 4.0)
        policy.record_acceptance(3, 3 if random.random() < 0.9 else 1)
    assert policy.choose(1) == 3
    for _ in range(300):  # acceptance collapses: plain decoding is fastest
        policy.record_acceptance(3, 0)
    assert policy.choose(1) == 0
    # a large batch has its own timings: drafting is slow there
    for k, t in {0: 10.0, 1: 22.0, 2: 34.0, 3: 46.0}.items():
        policy.record_step(8, k, t)
        policy.record_step(8, k, t)
    for _ in range(300):
        policy.record_acceptance(3, 3)
    assert policy.choose(8) == 0 and policy.choose(1) == 3
    assert DraftLengthPolicy(2, adaptive=False).choose(64) == 2


def test_draft_length_policy_drafts_until_the_acceptance_is_measured():
    """A few first verifications are a poor guide to the acceptance: after timing every length, the policy drafts
    until `window` verifications, even where no drafting timed faster; then it goes by the numbers."""
    policy = DraftLengthPolicy(2, window=8, explore_every=100, min_samples=2, margin=0.0, lengths=(0, 2))
    for _ in range(4):
        k = policy.choose(1)
        policy.record_step(1, k, {0: 1.0, 2: 2.5}[k])
    policy.record_acceptance(2, 0)  # one unlucky verification: 1 token per 2.5 would lose to 1 per 1.0
    assert [policy.choose(1) for _ in range(5)] == [2] * 5
    for _ in range(7):  # then 8 verifications, mostly accepted: 2.75 tokens per 2.5 beats 1 per 1.0
        policy.record_acceptance(2, 2)
    assert policy.choose(1) == 2
    for _ in range(64):
        policy.record_acceptance(2, 0)
    assert policy.choose(1) == 0


def test_draft_length_policy_compares_lengths_over_the_same_period_and_explores_them():
    """The machine gets twice as slow after the first timings: the best length stays the choice, and its
    neighbour keeps being timed."""
    policy = DraftLengthPolicy(2, window=8, explore_every=4, min_samples=2, margin=0.0)
    for _ in range(200):
        policy.record_acceptance(2, 2)  # always accepted: k=2 gives 3 tokens per step
    cost = {0: 1.0, 1: 1.7, 2: 2.2}  # k=2 best (3 / 2.2 > 2 / 1.7 > 1 / 1.0)
    chosen = []
    for step in range(400):
        k = policy.choose(1)
        chosen.append(k)
        slow = 2.0 if step > 100 else 1.0
        policy.record_step(1, k, cost[k] * slow)
    tail = chosen[200:]
    assert tail.count(2) > 0.7 * len(tail) and 1 in tail  # mostly the best, its neighbour still timed


def test_draft_length_policy_spaces_costly_explorations_by_their_cost():
    """Where a verification costs several steps (an eager one in a compiled engine at batch 8: ~6x), timing it
    again loses more than its turn: explorations are spaced so that their expected loss stays under
    explore_budget of the decode time, not every explore_every x 16 steps."""
    def explorations(budget: float) -> int:
        policy = DraftLengthPolicy(2, window=8, explore_every=4, min_samples=2, margin=0.0, lengths=(0, 2),
                                   explore_budget=budget)
        rng = random.Random(0)
        for _ in range(200):
            policy.record_acceptance(2, 2 if rng.random() < 0.9 else 1)  # 2.7 tokens per 6.0 < 1 per 1.0
        chosen = []
        for _ in range(2000):
            k = policy.choose(8)
            chosen.append(k)
            policy.record_step(8, k, {0: 1.0, 2: 6.0}[k])
        tail = chosen[100:]
        return sum(1 for a, b in zip(tail, tail[1:]) if a == 0 and b == 2)  # episodes started

    # lost per exploration ~ 6.0 x (1 - 0.45) + 5.0 = 8.3 steps' time: 2% -> one every ~415 steps
    assert 2 <= explorations(0.02) <= 6
    assert explorations(1.0) >= 20  # no budget to speak of: every explore_every x 16 = 64 steps


def test_draft_length_policy_keeps_to_the_lengths_it_is_given():
    """A compiled engine has a compiled verification of max_k drafts only: the policy never picks a length in
    between, neither to time it first nor to explore it, and still turns drafting off when that is faster."""
    policy = DraftLengthPolicy(3, window=8, explore_every=4, min_samples=2, margin=0.0, lengths=(0, 3))
    for _ in range(200):
        policy.record_acceptance(3, 3)
    chosen = []
    for step in range(300):
        k = policy.choose(1)
        chosen.append(k)
        policy.record_step(1, k, {0: 1.0, 3: 2.0}[k] if step < 150 else {0: 1.0, 3: 9.0}[k])
    assert set(chosen) == {0, 3}
    assert chosen[100:150].count(3) > 40 and chosen[-50:].count(0) > 40  # 4 tokens per 2.0 wins; then 1 per 1.0
    with pytest.raises(ValueError, match=r"lengths: expected draft lengths in 0..2 including 2"):
        DraftLengthPolicy(2, lengths=(0, 1))
    with pytest.raises(ValueError, match="lengths"):
        DraftLengthPolicy(2, lengths=(0, 3))


def test_spec_stats():
    s = SpecStats()
    s.record(3, 1)
    s.record(2, 2)
    s.record(0, 0)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, s.num_emitted_tokens) == (2, 5, 3, 5)
    assert s.mean_accepted_length == 2.5 and s.acceptance_by_position()[:3] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("token_map", [False, True])
def test_demo_model_greedy_with_mtp_is_identical_and_accepts_drafts(token_map):
    """The trained demo model: its MTP head's drafts are mostly right, and greedy output is unchanged; so with the
    draft vocabulary shipped beside it (speculative_token_map.json: its 1,024 most frequent training tokens)."""
    from qwen3next import DEFAULT_MODEL

    prompts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
               "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = Engine(DEFAULT_MODEL, max_memory="64MiB", max_model_len=256)
    config = {**spec(3), **({"speculative_token_map": str(DEFAULT_MODEL / "speculative_token_map.json")}
                            if token_map else {})}
    spec_engine = Engine(plain.model, tokenizer=plain.tokenizer, max_memory="64MiB", max_model_len=256,
                         speculative_config=config)
    want, got = run(plain, prompts, params), run(spec_engine, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec_engine.spec_stats.acceptance_rate > 0.5 and spec_engine.spec_stats.mean_accepted_length > 2
    if token_map:
        assert spec_engine.runner.draft_head.token_ids.numel() == 1024


def _mtp_keys_by_position(engine: Engine, prompt: list[int], params: SamplingParams, draft_steps) -> torch.Tensor:
    """Run one request whose steps draft or not as `draft_steps(step)` says; -> the MTP head's K rows of positions
    0 .. len(prompt) + max_tokens - 1, read through the sequence's last block table."""
    policy, step, table = engine.scheduler.draft_policy, [0], []
    policy.choose = lambda batch_size: (policy.max_k if draft_steps(step[0]) else 0)
    execute = engine.runner.execute

    def counted(batch):
        step[0] += 1
        table[:] = batch.entries[0].seq.block_table
        return execute(batch)

    engine.runner.execute = counted
    run(engine, [prompt], params)
    bs = engine.runner.cache.block_size
    rows = [table[p // bs] * bs + p % bs for p in range(len(prompt) + params.max_tokens)]
    return engine.runner.cache.k["mtp0"][rows].clone()


def test_mtp_head_kv_covers_the_steps_decoded_without_drafting(model, tokenizer):
    """Steps without drafting skip the MTP head; when drafting resumes, its K/V at those positions is written first
    (runner.MTPGap): the same, to fp32 rounding, as with drafting at every step. Without that, those positions hold
    nothing the head wrote (the acceptance after a pause fell from ~95% to ~50% on the demo model)."""
    prompt = prompts_of([20], seed=21)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    opts = dict(max_memory="32MiB", max_num_seqs=2, max_model_len=128, block_size=16,
                speculative_config=spec(2, adaptive=False), num_scheduler_steps=1)  # steps counted one by one
    always = _mtp_keys_by_position(Engine(model, tokenizer=tokenizer, **opts), prompt, params, lambda s: True)
    paused = lambda s: s < 4 or 12 <= s < 16 or s >= 22  # noqa: E731 -- pauses of 8 and 6 steps
    covered = len(prompt) + 30  # the steps after the last pause draft again: positions up to here are written
    got = _mtp_keys_by_position(Engine(model, tokenizer=tokenizer, **opts), prompt, params, paused)
    torch.testing.assert_close(got[:covered], always[:covered], atol=1e-4, rtol=1e-4)
    unfilled = Engine(model, tokenizer=tokenizer, **opts)
    unfilled.runner._keep_mtp_gaps = lambda *a: None  # what happened before: the gaps are not kept
    holes = _mtp_keys_by_position(unfilled, prompt, params, paused)
    assert (holes[:covered] - always[:covered]).abs().amax() > 0.1


def test_steps_without_drafting_run_as_multi_step_runs_and_keep_the_mtp_gap(model, tokenizer):
    """A speculative engine's steps the policy gives no drafts run as multi-step runs (num_scheduler_steps): the MTP
    head's inputs at every position of a run are kept, so its K/V, once drafting resumes, equals (to fp32 rounding)
    that of drafting at every step, and greedy tokens equal plain decoding's. (Through the ahead-of-time step's
    runs: test_aot_step.py.)"""
    multi_step_keeps_the_mtp_gap(model, tokenizer, prompts_of([20], seed=21)[0], compiled=False)


def multi_step_keeps_the_mtp_gap(model, tokenizer, prompt, compiled: bool) -> None:
    """The test above, for `model` (eager or compiled)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # the float MTP layer: the int8 one's activation codes can flip between two ways of computing the same row
    opts = dict(max_memory="32MiB", max_num_seqs=2, max_model_len=128, block_size=16,
                speculative_config={**spec(2, adaptive=False), "draft_head": "target"})
    always = _mtp_keys_by_position(Engine(model, tokenizer=tokenizer, num_scheduler_steps=1, **opts), prompt, params,
                                   lambda s: True)
    engine = Engine(model, tokenizer=tokenizer, num_scheduler_steps=4, compile_decode=compiled, **opts)
    engine.scheduler.config.multi_step_seconds = 60.0  # runs whatever this machine's speed
    runs, execute = [], engine.runner.execute
    engine.runner.execute = lambda batch: runs.append(batch.num_steps) or execute(batch)
    if compiled:
        hidden, decode_steps = [], engine.runner.compiled.decode_steps
        engine.runner.compiled.decode_steps = lambda *a, **k: hidden.append(k["keep_hidden"]) or decode_steps(*a, **k)
    got = _mtp_keys_by_position(engine, prompt, params, lambda s: s < 2 or s >= 6)  # steps 2-5: no drafts
    assert max(runs) == 4 and (not compiled or (hidden and all(hidden)))
    covered = len(prompt) + 30
    torch.testing.assert_close(got[:covered], always[:covered], atol=1e-4, rtol=1e-4)
    out = run(engine, [prompt], params)[0]
    assert out.token_ids == list(generate_tokens(model, prompt, 40))


def test_prompt_chunks_run_only_the_mtp_kv_and_match_the_full_forward(model, tokenizer):
    """Prefill chunks with MTP on write the head's K/V at the prompt positions without its attention and experts
    (dispatch "mtp_prompt_kv_only"), its whole forward only where a draft follows: the K/V rows of the prompt and the
    generated positions equal, to fp32 rounding, those of the full forward everywhere (the twin, fast paths off),
    and the outputs and the accepted drafts are the same."""
    from qwen3next.ops.dispatch import set_fast_decode

    prompt = prompts_of([45], seed=23)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # the float MTP layer: the int8 one's activation codes can flip between two ways of computing the same row
    opts = dict(max_memory="32MiB", max_num_seqs=2, max_model_len=128, block_size=16, prefill_chunk_size=16,
                speculative_config={**spec(2, adaptive=False), "draft_head": "target"})
    got = {}
    for fast in (True, False):
        engine = Engine(model, tokenizer=tokenizer, **opts)
        calls, table = [], []

        def write_kv(*a, _write=engine.runner._mtp_write_kv, _calls=calls, **k):
            _calls.append(a[0].shape[0])
            return _write(*a, **k)

        def execute(batch, _execute=engine.runner.execute, _table=table):
            _table[:] = batch.entries[0].seq.block_table
            return _execute(batch)

        engine.runner._mtp_write_kv, engine.runner.execute = write_kv, execute
        previous = set_fast_decode(fast)
        try:
            out = run(engine, [prompt], params)[0]
        finally:
            set_fast_decode(previous)
        bs = engine.runner.cache.block_size
        rows = [table[p // bs] * bs + p % bs for p in range(len(prompt) + params.max_tokens - 1)]
        cache = engine.runner.cache
        got[fast] = (out.outputs[0].token_ids, engine.spec_stats.accepted_per_position, cache.k["mtp0"][rows].clone(),
                     cache.v["mtp0"][rows].clone(), calls)
    assert got[True][4][:3] == [16, 16, 13] and got[False][4] == []  # the three prompt chunks took the fast path
    assert got[True][0] == got[False][0] and got[True][1] == got[False][1]
    torch.testing.assert_close(got[True][2], got[False][2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[True][3], got[False][3], atol=1e-4, rtol=1e-4)


def test_mtp_gap_keeps_a_bounded_tail():
    """A sequence decoding without drafts for long keeps between MAX_MTP_GAP and 2 x MAX_MTP_GAP positions, the
    latest ones, contiguous up to its last position."""
    M = runner_module.MAX_MTP_GAP
    gap = runner_module.MTPGap(seq=None, start=100)
    for i in range(2 * M - 1):
        gap.add(torch.full((1, 4), float(i)), [i])
    assert (gap.start, len(gap.tokens), gap.end) == (100, 2 * M - 1, 100 + 2 * M - 1)
    gap.add(torch.full((2, 4), float(2 * M - 1)), [2 * M - 1, 2 * M])
    assert (gap.start, gap.tokens[0], len(gap.tokens), gap.end) == (100 + M + 1, M + 1, M, 101 + 2 * M)
    rows = torch.cat(gap.hidden)
    assert rows.shape == (M, 4) and rows[0, 0] == M + 1 and rows[-1, 0] == 2 * M - 1


def test_int8_draft_head_keeps_the_output_and_the_drafts(model, tokenizer):
    """draft_head "int8" (the default for a float lm_head with the native kernels): the drafts' logits from an int8
    copy of lm_head; the output stays the target's, and the drafts are the same as with lm_head itself here (the
    tiny model's logits are far from ties at int8's error)."""
    prompts = prompts_of([5, 30, 12], seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    opts = dict(max_memory="32MiB", max_num_seqs=3, max_model_len=128, block_size=16)
    plain = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    engines = {head: Engine(model, tokenizer=tokenizer, speculative_config={**spec(2), "draft_head": head}, **opts)
               for head in ("int8", "target")}
    assert isinstance(engines["int8"].runner.draft_head, Int8Linear)
    assert engines["target"].runner.draft_head is model.lm_head
    # the MTP layer drafts run through: an int8 copy (projections and experts; the router stays float), or the model's
    draft_mtp = engines["int8"].runner.draft_mtp
    assert draft_mtp is not model.mtp and isinstance(draft_mtp.layers[0].mlp.experts, QuantizedExperts)
    assert isinstance(draft_mtp.fc, Int8Linear) and not isinstance(draft_mtp.layers[0].mlp.gate, Int8Linear)
    assert isinstance(model.mtp.fc, torch.nn.Linear) and not isinstance(model.mtp.fc, Int8Linear)
    assert engines["target"].runner.draft_mtp is model.mtp
    for engine in engines.values():
        assert [o.token_ids for o in run(engine, prompts, params)] == [o.token_ids for o in plain]
    stats = [(e.spec_stats.num_draft_tokens, e.spec_stats.num_accepted_tokens) for e in engines.values()]
    assert stats[0] == stats[1] and stats[0][0] > 0
    default = Engine(model, tokenizer=tokenizer, speculative_config=spec(2), **opts).runner.draft_head
    assert isinstance(default, Int8Linear) == kernels.available()


def test_compiled_decode_with_mtp_is_token_identical(model, tokenizer):
    """compile_decode: plain decode steps and batch-1 verifications of k drafts (and the MTP head's forwards there)
    run compiled graphs, other verifications eagerly; nothing compiles while serving."""
    from test_compiled_decode import needs_compiler

    if needs_compiler.args[0]:
        pytest.skip(needs_compiler.kwargs["reason"])
    prompts = prompts_of([5, 30, 12], seed=8)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 24, 9)]
    opts = dict(max_memory="32MiB", max_num_seqs=3, max_model_len=128, block_size=16)
    plain = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, compile_decode=True, speculative_config=spec(2), **opts)
    with_oracle_drafts(engine, {f"req-{i}": o.token_ids for i, o in enumerate(plain)}, corrupt=0.3)
    compiled, calls = engine.runner.compiled, []
    forward = compiled.forward
    compiled.forward = lambda *a: calls.append(a[1].capture_states) or forward(*a)
    graphs = dict(torch._dynamo.utils.counters["stats"])
    got = run(engine, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert engine.spec_stats.num_accepted_tokens > 0
    assert any(calls)  # batch-1 verifications ran the compiled graph (the last sequence decodes alone)
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # the warm-up compiled everything served



def test_drafts_stop_at_max_model_len(model, tokenizer):
    """Sequences that end exactly at max_model_len, with the longest drafts: never a token or a K/V row past the
    limit (the lookahead blocks too), and the output of plain decoding."""
    prompts = prompts_of([50, 57, 44], seed=13)
    params = [SamplingParams(temperature=0, max_tokens=64 - len(p), ignore_eos=True) for p in prompts]
    opts = dict(max_memory="64MiB", max_num_seqs=3, max_model_len=64, block_size=16)
    want = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    engine = Engine(model, tokenizer=tokenizer, speculative_config=spec(4), **opts)
    with_oracle_drafts(engine, {f"req-{i}": o.token_ids for i, o in enumerate(want)}, corrupt=0.1)
    got = run(engine, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [len(p) + len(o.token_ids) for p, o in zip(prompts, got)] == [64, 64, 64]
    assert engine.spec_stats.num_accepted_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.plan.num_blocks


# ---- a draft vocabulary (speculative_token_map) ----------------------------------------------------------------------


def _recording_drafts(execute, drafted: list[int]):
    def recorded(batch):
        out = execute(batch)
        drafted.extend(t for d in out.drafts for t in d)
        return out

    return recorded


def test_draft_token_map_restricts_the_drafts_and_keeps_the_output(model, tokenizer, tmp_path):
    """speculative_token_map: the drafts' logits come from the map's rows of the head only (-inf elsewhere, the
    same values there as the full head's), every draft is a map token, and the output stays plain decoding's, also
    when the map holds a single token (every draft then that token)."""
    from qwen3next.engine.draft_vocab import DraftVocabHead

    prompts = prompts_of([5, 30, 12], seed=21)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    opts = dict(max_memory="32MiB", max_num_seqs=3, max_model_len=128, block_size=16)
    plain = run(Engine(model, tokenizer=tokenizer, **opts), prompts, params)
    ids = list(range(VOCAB - 1, 0, -2))  # odd ids, most "frequent" first: not sorted, not contiguous
    (tmp_path / "map.json").write_text(str(ids))
    torch.save(torch.tensor([7], dtype=torch.int32), tmp_path / "one.pt")
    h = torch.randn(4, model.config.hidden_size)
    for head, path, allowed in (("target", "map.json", ids), ("int8", "map.json", ids), (None, "one.pt", [7])):
        config = {**spec(2), "draft_head": head, "speculative_token_map": str(tmp_path / path)}
        engine = Engine(model, tokenizer=tokenizer, speculative_config=config, **opts)
        draft_head = engine.runner.draft_head
        assert isinstance(draft_head, DraftVocabHead)
        with torch.no_grad():
            full = (model.lm_head if head == "target" else Int8Linear.from_linear(model.lm_head))(h)
            got = draft_head(h)
        outside = torch.ones(VOCAB, dtype=torch.bool)
        outside[allowed] = False
        assert got.shape == full.shape and torch.isneginf(got[:, outside]).all()
        assert torch.allclose(got[:, allowed], full[:, allowed], atol=1e-5, rtol=0)
        assert (engine.runner.draft_mtp is model.mtp) == (head == "target")
        drafted = []
        engine.runner.execute = _recording_drafts(engine.runner.execute, drafted)
        assert [o.token_ids for o in run(engine, prompts, params)] == [o.token_ids for o in plain]
        assert drafted and set(drafted) <= set(allowed)
        assert engine.spec_stats.num_draft_tokens > 0


def test_draft_token_map_errors(model, tokenizer, tmp_path):
    from qwen3next.engine.draft_vocab import head_rows, load_token_map
    from qwen3next.quant.linear import Int4Linear

    cases = {"missing.json": (None, "no such file"), "text.json": ("[1, 2", "not a JSON list"),
             "empty.json": ("[]", "non-empty list"), "object.json": ('{"ids": [1]}', "non-empty list"),
             "range.json": (f"[1, {VOCAB}]", f"{VOCAB} is not a token id"), "neg.json": ("[-1]", "-1 is not"),
             "float.json": ("[1.0]", "1.0 is not"), "dup.json": ("[3, 4, 3]", "token id 3 is listed more than once"),
             "garbage.pt": ("not a torch file", "not a torch file"),
             "float.pt": (torch.ones(3), "1-D integer tensor"), "2d.pt": (torch.ones(2, 2, dtype=torch.long), "1-D")}
    for name, (content, match) in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(ValueError, match=match):
            load_token_map(path, VOCAB)
    torch.save([5, 2, 9], tmp_path / "list.pt")
    assert load_token_map(tmp_path / "list.pt", VOCAB) == [5, 2, 9]
    with pytest.raises(ValueError, match="speculative_token_map must be the path"):
        SpeculativeConfig.parse({"method": "mtp", "speculative_token_map": 5})
    with pytest.raises(ValueError, match="speculative_token_map 'nope.json': no such file"):
        Engine(model, tokenizer=tokenizer, max_memory="32MiB", max_model_len=64,
               speculative_config={**spec(2), "speculative_token_map": "nope.json"})
    with pytest.raises(ValueError, match="speculative_token_map is not supported with tensor_parallel_size > 1"):
        Engine("no-such-dir", tensor_parallel_size=2, speculative_config={**spec(2), "speculative_token_map": "m"})
    int4 = Int4Linear.from_linear(torch.nn.Linear(64, VOCAB, bias=False), group_size=32)
    with pytest.raises(ValueError, match="needs a float or int8 lm_head to take rows from; this model's is Int4Linear"):
        head_rows(int4, torch.tensor([1, 2]))
