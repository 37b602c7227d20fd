"""The server with MTP speculative decoding on: the same requests, sent with the official `openai` client to a plain
server and to servers with `speculative_config` (k = 2 fixed, k = 3 adaptive, k = 2 over a draft vocabulary), give
the same text, tokens, usage and logprobs, streamed or not, greedy or seeded; /metrics exposes the spec_decode
families; a bad `--speculative-config` is a usage error (exit 2)."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import openai
import pytest
from test_server import KEY, MAX_LEN, MODEL, http, serving

from qwen3next.cli import main as cli_main
from qwen3next.engine.llm import LLM
from qwen3next.engine.sampling import SamplingParams
from qwen3next.engine.speculative import SpeculativeConfig
from tiny_models import make_model, write_byte_tokenizer

SPECS = {
    "plain": None,
    "k2": {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False},  # always 2 drafts per step
    "k3": {"method": "mtp", "num_speculative_tokens": 3},  # adaptive: 0..3 drafts, chosen from step timings
    # drafts restricted to a draft vocabulary (every other byte token; written beside the model by the fixture)
    "k2map": {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False, "speculative_token_map": "map.json"},
}
MAX_TOKENS = 24
PROMPTS = ["Once upon a time", "The quick brown fox jumps", "1, 2, 3,", "why? " * 30, "x"]
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One tiny random model (with its MTP head) served once per SPECS entry; name -> (llm, openai client, base URL)."""
    d = tmp_path_factory.mktemp("tiny_spec_server")
    make_model("base", vocab_size=261, max_position_embeddings=MAX_LEN).save_pretrained(d)
    write_byte_tokenizer(d)
    (d / "map.json").write_text(json.dumps(list(range(0, 261, 2))))
    out = {}
    with ExitStack() as stack:
        for name, spec in SPECS.items():
            if spec is not None and "speculative_token_map" in spec:
                spec = {**spec, "speculative_token_map": str(d / spec["speculative_token_map"])}
            llm = LLM(d, max_memory="64MiB", max_model_len=MAX_LEN, max_num_seqs=8, speculative_config=spec)
            base = stack.enter_context(serving(llm, KEY))
            out[name] = llm, openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60), base
        yield out


def on_all(servers, cases) -> dict[str, list]:
    """Run every case (a function of a client) on every server, the cases of one server concurrently (so the
    speculative engine batches sequences with different drafts and acceptances); name -> results in case order."""
    with ThreadPoolExecutor(8) as pool:
        futures = {name: [pool.submit(case, client) for case in cases] for name, (_, client, _) in servers.items()}
        return {name: [f.result() for f in fs] for name, fs in futures.items()}


def same(a, b, path="") -> None:
    """a == b, floats within 1e-4 (logprobs of a k+1-token verification forward vs. one-token decode steps)."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, abs_tol=1e-4), f"{path}: {a} != {b}"
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_all_like_plain(results: dict[str, list], labels: list[str]) -> None:
    for name, got in results.items():
        for label, g, want in zip(labels, got, results["plain"]):
            same(g, want, f"{name} {label}")


def usage(u) -> tuple[int, int, int]:
    return u.prompt_tokens, u.completion_tokens, u.total_tokens


def greedy(**extra) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, **extra}


# ---- request cases: each returns a plain-data summary of the response -------------------------------------------


def completion(prompt, **kw):
    def case(client):
        r = client.completions.create(prompt=prompt, **greedy(**kw))
        return [(c.index, c.text, c.finish_reason) for c in r.choices], usage(r.usage)
    return case


def completion_streamed(prompt, **kw):
    def case(client):
        chunks = list(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                                **greedy(**kw)))
        body = [c for c in chunks if c.choices]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        text = "".join(c.choices[0].text for c in body)
        return [(0, text, body[-1].choices[0].finish_reason)], usage(chunks[-1].usage)
    return case


def chat(messages, **kw):
    def case(client):
        r = client.chat.completions.create(messages=messages, **greedy(**kw))
        return [(c.index, c.message.content, c.finish_reason) for c in r.choices], usage(r.usage)
    return case


def chat_streamed(messages, **kw):
    def case(client):
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **greedy(**kw)))
        body = [c for c in chunks if c.choices]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        text = "".join(c.choices[0].delta.content or "" for c in body)
        return [(0, text, body[-1].choices[0].finish_reason)], usage(chunks[-1].usage)
    return case


def completion_logprobs(prompt, stream=False):
    def case(client):
        kw = greedy(logprobs=2, extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in client.completions.create(prompt=prompt, stream=True, **kw) if c.choices]
            lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
            text = "".join(c.choices[0].text for c in chunks)
            tokens = [t for lp in lps for t in lp.tokens]
            token_lps = [x for lp in lps for x in lp.token_logprobs]
            tops = [t for lp in lps for t in lp.top_logprobs]
        else:
            r = client.completions.create(prompt=prompt, **kw)
            lp = r.choices[0].logprobs
            text, tokens, token_lps, tops = r.choices[0].text, lp.tokens, lp.token_logprobs, lp.top_logprobs
        assert len(tokens) == len(token_lps) == len(tops) == MAX_TOKENS
        return text, tokens, token_lps, [dict(t) for t in tops]
    return case


def chat_logprobs(messages, stream=False):
    def case(client):
        kw = greedy(logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in client.chat.completions.create(messages=messages, stream=True, **kw) if c.choices]
            content = [e for c in chunks if c.choices[0].logprobs is not None
                       for e in c.choices[0].logprobs.content or []]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            r = client.chat.completions.create(messages=messages, **kw)
            content, text = r.choices[0].logprobs.content, r.choices[0].message.content
        assert len(content) == MAX_TOKENS
        return text, [(e.token, e.bytes, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in content]
    return case


def seeded_completion(prompt, seed=5):
    def case(client):
        r = client.completions.create(model=MODEL, prompt=prompt, temperature=0.9, seed=seed, n=2,
                                      max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
        return [(c.index, c.text, c.finish_reason) for c in r.choices], usage(r.usage)
    return case


def seeded_chat(messages, seed=5, stream=False):
    def case(client):
        kw = dict(model=MODEL, messages=messages, temperature=0.9, top_p=0.95, seed=seed, max_tokens=MAX_TOKENS)
        if stream:
            chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
            return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    return case


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_greedy_text_and_usage_match_plain_serving(servers):
    """Streamed and non-streamed chat and completions, with EOS allowed (a stop may fall inside an accepted run)
    and ignored (always max_tokens)."""
    cases, labels = [], []
    for i, (prompt, messages) in enumerate(zip(PROMPTS, CHATS)):
        eos = {"extra_body": {"ignore_eos": True}} if i % 2 else {}
        for make, arg in ((completion, prompt), (completion_streamed, prompt), (chat, messages),
                          (chat_streamed, messages)):
            cases.append(make(arg, **eos))
            labels.append(f"{make.__name__}({str(arg)[:30]!r}, {eos})")
    results = on_all(servers, cases)
    assert_all_like_plain(results, labels)
    plain = results["plain"]
    for j in range(0, len(cases), 4):  # streamed == non-streamed on the plain server too
        assert plain[j] == plain[j + 1] and plain[j + 2] == plain[j + 3], labels[j]
        assert all(u[1] >= 1 for _, u in plain[j:j + 4])
    assert any(u[1] == MAX_TOKENS for _, u in plain)


def test_greedy_logprobs_match_plain_serving(servers):
    cases = [completion_logprobs(PROMPTS[0]), completion_logprobs(PROMPTS[3], stream=True),
             chat_logprobs(CHATS[1]), chat_logprobs(CHATS[2], stream=True)]
    labels = ["completion logprobs=2", "completion logprobs=2 streamed", "chat top_logprobs=2",
              "chat top_logprobs=2 streamed"]
    results = on_all(servers, cases)
    assert_all_like_plain(results, labels)
    _, tokens, token_lps, tops = results["plain"][0]
    for token, lp, top in zip(tokens, token_lps, tops):  # greedy: the emitted token is the most likely one
        assert token in top and lp == pytest.approx(max(top.values()))


def test_seeded_sampling_matches_plain_serving(servers):
    cases = [seeded_completion(PROMPTS[0]), seeded_completion(PROMPTS[2], seed=11), seeded_chat(CHATS[1]),
             seeded_chat(CHATS[4], seed=6, stream=True)]
    labels = ["completion seed=5 n=2", "completion seed=11 n=2", "chat seed=5", "chat seed=6 streamed"]
    results = on_all(servers, cases)
    assert_all_like_plain(results, labels)
    (a, b), _ = results["plain"][0]
    assert a[1] != b[1]  # n=2 draws two different samples (seed, seed + 1 streams), not one twice


def with_oracle_drafts(monkeypatch, llm: LLM, oracle: dict[tuple, list[int]], corrupt: float = 0.15) -> None:
    """Replace the MTP head's drafts by the plain continuation ((prompt ids, sample index, greedy) -> output ids), a
    fraction `corrupt` of them changed: a random model's MTP head is never right, and the server's handling of several
    tokens per step (stream deltas, logprobs, stops inside an accepted run) needs drafts that mostly are."""
    runner, rng = llm.engine.runner, random.Random(0)
    execute = runner.execute

    def patched(batch):
        out = execute(batch)
        if out is not None and out.drafts:
            for j, seq in enumerate(batch.sampled_seqs):
                want = oracle.get((tuple(seq.prompt_token_ids), seq.sample_index, seq.params.temperature == 0), [])
                done = seq.num_output_tokens + len(out.tokens[j])
                drafts = want[done:done + len(out.drafts[j])]
                out.drafts[j] = [t if rng.random() >= corrupt else (t + 1) % 256 for t in drafts]
        return out

    monkeypatch.setattr(runner, "execute", patched)


def test_accepted_runs_match_plain_serving(servers, monkeypatch):
    """Mostly-right drafts: several tokens per step reach the streams, logprobs, stop strings, EOS, max_tokens and
    n > 1 exactly as one token per step does."""
    plain_llm, plain, _ = servers["plain"]
    tok = plain_llm.tokenizer
    chats = [[{"role": "user", "content": f"tell me about {w}"}] for w in ("cats", "the sea", "numbers")]
    texts = ["In the beginning", "def f(x):", "abcabcabc"]
    greedy_prompts = [plain_llm.chat_prompt(m) for m in chats] + [tok.encode(t) for t in texts]
    oracle = {}
    for p, o in zip(greedy_prompts, plain_llm.generate(greedy_prompts, SamplingParams(
            temperature=0, max_tokens=2 * MAX_TOKENS, ignore_eos=True))):
        oracle[tuple(p), 0, True] = o.token_ids
    seeded = SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=MAX_TOKENS, ignore_eos=True)
    seeded_ids = tok.encode(texts[0])
    for i, o in enumerate(plain_llm.generate([seeded_ids], seeded)[0].outputs):
        oracle[tuple(seeded_ids), i, False] = o.token_ids  # the same prompt as a greedy case: keyed apart
    # stop strings from the middle of the plain outputs (mostly matched inside an accepted run)
    stop_chat = plain.chat.completions.create(messages=chats[0], **greedy(
        extra_body={"ignore_eos": True})).choices[0].message.content[9:11]
    stop_text = plain.completions.create(prompt=texts[1], **greedy(extra_body={"ignore_eos": True})).choices[0].text
    stop_text = stop_text[13:15]
    assert stop_chat and stop_text
    odd = {"max_tokens": 17, "extra_body": {"ignore_eos": True}}  # not a multiple of the k + 1 tokens of a run
    cases = [chat(chats[0], stop=[stop_chat]), chat_streamed(chats[0], stop=[stop_chat]), chat(chats[1], **odd),
             chat_streamed(chats[2]), chat_logprobs(chats[1], stream=True), chat_logprobs(chats[2]),
             completion(texts[1], stop=[stop_text]), completion_streamed(texts[1], stop=[stop_text]),
             completion_streamed(texts[2], **odd), completion(texts[2], n=2, extra_body={"ignore_eos": True}),
             completion_logprobs(texts[0], stream=True), completion_logprobs(texts[2]),
             seeded_completion(texts[0])]
    labels = ["chat stop", "chat stop streamed", "chat max_tokens=17", "chat streamed", "chat logprobs streamed",
              "chat logprobs", "completion stop", "completion stop streamed", "completion max_tokens=17 streamed",
              "completion n=2", "completion logprobs streamed", "completion logprobs", "completion seed=5 n=2"]
    before = {name: llm.stats() for name, (llm, _, _) in servers.items() if SPECS[name]}
    for name in before:
        with_oracle_drafts(monkeypatch, servers[name][0], oracle)
    results = on_all(servers, cases)
    assert_all_like_plain(results, labels)
    got = results["plain"]
    assert got[0][0][0][2] == got[6][0][0][2] == "stop"
    assert got[2][1][1] == got[8][1][1] == 17
    for name, b in before.items():
        s = servers[name][0].stats()
        drafted, accepted = s["spec_draft_tokens"] - b["spec_draft_tokens"], s["spec_accepted_tokens"] - b[
            "spec_accepted_tokens"]
        runs = s["spec_drafts"] - b["spec_drafts"]
        if SPECS[name].get("adaptive", True) and runs == 0:
            # the adaptive server picks its draft length from step timings: on a busy machine it may time drafting
            # as slower and not draft during these requests (seen once in a full-suite run); its output is still
            # checked above, and the fixed-k server (k2) always drafts
            continue
        assert accepted > 0.5 * drafted and (runs + accepted) / runs > 1.5, (name, runs, drafted, accepted)


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_metrics_expose_spec_decode_counters(servers):
    before = {name: http().get(f"{base}/metrics").text for name, (_, _, base) in servers.items()}
    on_all(servers, [chat(CHATS[3], extra_body={"ignore_eos": True}), completion(PROMPTS[1]),
                     seeded_completion(PROMPTS[4])])
    texts = {name: http().get(f"{base}/metrics").text for name, (_, _, base) in servers.items()}
    assert "spec_decode" not in texts["plain"]
    for name in ("prompt_tokens_total", "generation_tokens_total"):  # the same requests: the same token counts
        name = f"qwen3next_{name}"
        deltas = {s: _metric(t, name) - _metric(before[s], name) for s, t in texts.items()}
        assert deltas["plain"] > 0 and len(set(deltas.values())) == 1, (name, deltas)  # rejected drafts not counted
    for name, spec in SPECS.items():
        if spec is None:
            continue
        k, t = spec["num_speculative_tokens"], texts[name]
        for family in ("num_drafts_total", "num_draft_tokens_total", "num_accepted_tokens_total",
                       "num_emitted_tokens_total"):
            assert f"# TYPE qwen3next_spec_decode_{family} counter" in t, (name, family)
        assert "# TYPE qwen3next_spec_decode_mean_accepted_length gauge" in t
        drafts = _metric(t, "qwen3next_spec_decode_num_drafts_total")
        draft_tokens = _metric(t, "qwen3next_spec_decode_num_draft_tokens_total")
        accepted = _metric(t, "qwen3next_spec_decode_num_accepted_tokens_total")
        emitted = _metric(t, "qwen3next_spec_decode_num_emitted_tokens_total")
        mean = _metric(t, "qwen3next_spec_decode_mean_accepted_length")
        assert draft_tokens > 0 and 0 <= accepted <= draft_tokens, (name, draft_tokens, accepted)
        assert drafts <= draft_tokens <= k * drafts, (name, drafts, draft_tokens)
        assert emitted == drafts + accepted
        assert 1 <= mean <= k + 1 and mean == pytest.approx(emitted / drafts), (name, mean)
        assert 0 <= _metric(t, "qwen3next_spec_decode_draft_length") <= k
        per_pos = [_metric(t, f'qwen3next_spec_decode_num_accepted_tokens_per_pos{{position="{j}"}}')
                   for j in range(k)]
        assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True), (name, per_pos)
        assert emitted <= _metric(t, "qwen3next_generation_tokens_total")
        stats = servers[name][0].stats()
        assert stats["free_blocks"] == stats["total_blocks"] and stats["free_slots"] == stats["total_slots"]


def test_serve_rejects_a_bad_speculative_config(capsys):
    bad = '{"method": "mtp", "num_speculative_tokens": 9}'
    with pytest.raises(SystemExit) as e:
        cli_main(["serve", "--speculative-config", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and "num_speculative_tokens" in err and "9" in err, err
    for other in ("{not json", '{"method": "eagle"}', '{"num_speculative_tokens": 2}'):
        with pytest.raises(SystemExit) as e:
            cli_main(["serve", "--speculative-config", other])
        assert e.value.code == 2 and "--speculative-config" in capsys.readouterr().err
    from qwen3next.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--speculative-config",
                                             '{"method": "qwen3_next_mtp", "num_speculative_tokens": 3}'])
    assert args.speculative_config == SpeculativeConfig("qwen3_next_mtp", 3, True)
    assert build_parser("serve").parse_args(["serve"]).speculative_config is None
    # the real entry point: a usage error, no traceback, before any model is loaded
    r = subprocess.run([sys.executable, "-m", "qwen3next.cli", "serve", "--speculative-config", bad],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "num_speculative_tokens" in r.stderr and "Traceback" not in r.stderr, r.stderr
