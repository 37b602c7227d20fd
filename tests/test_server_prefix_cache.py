"""Prefix caching through the server: a real server on loopback (caching on, the default) and its twin started with
caching off, driven by the official `openai` client. A multi-turn conversation reports the cached part of each
resent prompt in `usage.prompt_tokens_details.cached_tokens` (0 on the first turn and with caching off, always
present, as OpenAI sends it) and answers exactly as without the cache; /metrics counts the lookups and hits and shows
the snapshots; the command-line flags reach the engine and reject bad values."""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
import uuid
from contextlib import ExitStack

import openai
import pytest
from test_server import KEY, MAX_LEN, MODEL, http, serving

from qwen3next.argtypes import ENGINE_BLOCK_SIZE
from qwen3next.cli import build_parser
from qwen3next.engine.llm import LLM, Engine
from qwen3next.server.args import add_serve_args
from tiny_models import make_model, write_byte_tokenizer

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_prefix_server")
    make_model("base", vocab_size=261, max_position_embeddings=MAX_LEN).save_pretrained(d)
    write_byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def servers(model_dir):
    """name ("on" / "off") -> (llm, openai client, base URL): the same model served with and without caching."""
    out = {}
    with ExitStack() as stack:
        for name, on in (("on", True), ("off", False)):
            llm = LLM(model_dir, max_memory="64MiB", max_model_len=MAX_LEN, max_num_seqs=4, enable_prefix_caching=on)
            base = stack.enter_context(serving(llm, KEY))
            out[name] = llm, openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60), base
        yield out


def greedy(**kw) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}, **kw}


def cached(usage) -> int:
    assert usage.prompt_tokens_details is not None, "prompt_tokens_details must always be sent"
    return usage.prompt_tokens_details.cached_tokens


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def converse(client, system: str, turns: list[str]) -> list:
    """Send the conversation one turn at a time, each time resending it all with the previous reply appended;
    returns the responses."""
    messages = [{"role": "system", "content": system}]
    out = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        r = client.chat.completions.create(messages=messages, **greedy())
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        out.append(r)
    return out


def test_conversation_reports_cached_tokens_and_answers_as_without_cache(servers):
    system = f"You are a terse assistant. Session {uuid.uuid4().hex}."  # no earlier request shares this prefix
    turns = ["Hello there!", "Tell me about the weather today.", "And tomorrow?", "Thanks, bye."]
    on_llm, on, on_base = servers["on"]
    _, off, _ = servers["off"]
    before = http().get(f"{on_base}/metrics").text
    got, want = converse(on, system, turns), converse(off, system, turns)
    assert [r.choices[0].message.content for r in got] == [r.choices[0].message.content for r in want]
    assert [r.usage.prompt_tokens for r in got] == [r.usage.prompt_tokens for r in want]
    assert [cached(r.usage) for r in want] == [0] * len(turns)
    assert cached(got[0].usage) == 0
    for k in range(1, len(turns)):
        # at least the previous prompt but its last token: its snapshot is taken one token before its end
        assert got[k - 1].usage.prompt_tokens - 1 <= cached(got[k].usage) < got[k].usage.prompt_tokens, k
    after = http().get(f"{on_base}/metrics").text
    prompt_tokens = sum(r.usage.prompt_tokens for r in got)
    queries, hits = (metric(after, n) - metric(before, n) for n in ("qwen3next_prefix_cache_queries_total",
                                                                     "qwen3next_prefix_cache_hits_total"))
    assert queries == prompt_tokens and hits == sum(cached(r.usage) for r in got) > 0
    stats = on_llm.stats()
    assert metric(after, "qwen3next_prefix_cache_snapshots") == stats["prefix_cache_snapshots"] > 0
    assert metric(after, "qwen3next_prefix_cache_snapshot_bytes") == (
        stats["prefix_cache_snapshots"] * on_llm.engine.plan.geometry.state_bytes_per_slot)
    assert metric(after, "qwen3next_prefix_cache_snapshot_slots") == on_llm.engine.plan.num_snapshot_slots > 0
    assert metric(after, "qwen3next_prefix_cache_blocks") == stats["prefix_cache_blocks"] > 0
    for kind, name in (("counter", "queries_total"), ("counter", "hits_total"), ("gauge", "blocks"),
                       ("gauge", "snapshots"), ("gauge", "snapshot_bytes")):
        assert f"# TYPE qwen3next_prefix_cache_{name} {kind}" in after


def test_streamed_and_legacy_usage_carry_cached_tokens(servers):
    _, client, _ = servers["on"]
    messages = [{"role": "user", "content": f"Stream this {uuid.uuid4().hex}"}]
    first = client.chat.completions.create(messages=messages, **greedy())
    assert cached(first.usage) == 0
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **greedy()))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == first.usage.prompt_tokens
    assert cached(usage) == usage.prompt_tokens - 1  # an identical prompt: everything but the token it feeds
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content

    prompt = f"Once upon a time {uuid.uuid4().hex}"
    a = client.completions.create(prompt=prompt, **greedy())
    b = client.completions.create(prompt=prompt, **greedy())
    streamed = list(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                              **greedy()))
    assert cached(a.usage) == 0 and cached(b.usage) == b.usage.prompt_tokens - 1
    assert streamed[-1].usage is not None and cached(streamed[-1].usage) == cached(b.usage)
    assert a.choices[0].text == b.choices[0].text == "".join(c.choices[0].text for c in streamed if c.choices)
    # several prompts in one request: their cached tokens add up
    both = client.completions.create(prompt=[prompt, prompt + " again"], **greedy())
    assert both.usage.prompt_tokens == 2 * b.usage.prompt_tokens + len(" again")
    assert cached(both.usage) >= 2 * cached(b.usage)


def test_caching_off_reports_zero_and_no_prefix_metrics(servers):
    llm, client, base = servers["off"]
    assert not llm.engine.enable_prefix_caching and llm.engine.plan.num_snapshot_slots == 0
    messages = [{"role": "user", "content": "same prompt twice"}]
    for _ in range(2):
        assert cached(client.chat.completions.create(messages=messages, **greedy()).usage) == 0
    raw = client.chat.completions.with_raw_response.create(messages=messages, **greedy()).http_response.json()
    assert raw["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # sent as OpenAI sends it
    assert "prefix_cache" not in http().get(f"{base}/metrics").text


# ---- command line ----------------------------------------------------------------------------------------------


def test_flags_parse_on_serve_generate_and_chat():
    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    parsers = [(serve, []), (build_parser("generate"), ["generate", "--prompt", "x"]), (build_parser("chat"), ["chat"])]
    for parser, head in parsers:
        args = parser.parse_args(head)
        assert (args.enable_prefix_caching, args.prefix_snapshot_slots, args.prefix_snapshot_interval) == (
            True, None, None)
        args = parser.parse_args([*head, "--no-enable-prefix-caching"])
        assert args.enable_prefix_caching is False
        args = parser.parse_args([*head, "--enable-prefix-caching", "--prefix-snapshot-slots", "3",
                                  "--prefix-snapshot-interval", "128"])
        assert (args.enable_prefix_caching, args.prefix_snapshot_slots, args.prefix_snapshot_interval) == (True, 3, 128)
        assert parser.parse_args([*head, "--prefix-snapshot-interval", "0"]).prefix_snapshot_interval == 0
    # the interval is checked against the engine's block size, which no option changes
    assert inspect.signature(Engine).parameters["block_size"].default == ENGINE_BLOCK_SIZE


@pytest.mark.parametrize("args,needle", [
    (["--prefix-snapshot-slots", "-1"], "--no-enable-prefix-caching"),
    (["--prefix-snapshot-slots", "many"], "integer >= 0"),
    (["--prefix-snapshot-interval", "100"], f"multiple of the KV block size {ENGINE_BLOCK_SIZE}"),
    (["--prefix-snapshot-interval", "-64"], "multiple"),
    (["--no-enable-prefix-caching", "--prefix-snapshot-slots", "2"], "has no effect"),
    (["--no-enable-prefix-caching", "--prefix-snapshot-interval", "64"], "has no effect"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(args, needle):
    flag = next(a for a in args if a.startswith("--prefix"))
    r = subprocess.run([sys.executable, "-m", "qwen3next.cli", "serve", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"argument {flag}" in r.stderr and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags,on,slots,interval", [
    ([], True, None, None),
    (["--prefix-snapshot-slots", "3", "--prefix-snapshot-interval", "128"], True, 3, 128),
    (["--no-enable-prefix-caching"], False, 0, None),
])
def test_serve_builds_the_engine_with_the_flags(model_dir, monkeypatch, capsys, flags, on, slots, interval):
    """`run_serve` up to the point where uvicorn would listen: the engine it built, and what it printed."""
    import uvicorn

    from qwen3next.server import app as server_app

    built = {}

    class NoServer:
        def __init__(self, config):
            self.started = True

        def run(self):
            pass

    def create_app(llm, *args):
        built["engine"] = llm.engine
        return object()

    monkeypatch.setattr(uvicorn, "Server", NoServer)
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: None)
    monkeypatch.setattr(server_app, "create_app", create_app)
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--model", str(model_dir), "--max-memory", "16MiB", "--max-model-len", "256",
                              "--max-num-seqs", "2", *flags])
    assert server_app.run_serve(args) == 0
    engine = built["engine"]
    assert engine.enable_prefix_caching is on
    if slots is not None:
        assert engine.plan.num_snapshot_slots == slots
    else:
        assert engine.plan.num_snapshot_slots == 8  # automatic: four per sequence
    if interval is not None:
        assert engine.scheduler.config.snapshot_policy.interval == interval
    out = capsys.readouterr().out
    assert f"prefix caching: {'on' if on else 'off'}" in out
