"""The OpenAI-compatible server end to end: a real uvicorn server on loopback over tiny models, driven by the
official `openai` client (and raw httpx for malformed input, SSE framing and disconnects)."""

from __future__ import annotations

import argparse
import functools
import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from qwen3next.engine.llm import LLM
from qwen3next.engine.sampling import SamplingParams
from qwen3next.server.app import add_serve_args, create_app
from qwen3next.server.metrics import Counter, Histogram
from tiny_models import make_model, write_byte_tokenizer

KEY = "test-key"
MODEL = "tiny"
MAX_LEN = 1024
BODY_LIMIT = 64 * 1024
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@functools.cache
def http() -> httpx.Client:
    """One pooled client for the raw requests (a new httpx client per call costs ~50 ms of TLS setup)."""
    return httpx.Client(timeout=60)


class ReadyServer(uvicorn.Server):
    """A uvicorn server that says when it is up (`ready`), for servers run in a thread."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def serving(llm: LLM, api_key: str | None):
    """Run the app on a free loopback port in a background thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(llm, MODEL, api_key, max_body_bytes=BODY_LIMIT)
    server = ReadyServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(30), "server did not start"
        base = f"http://127.0.0.1:{port}"
        assert http().get(f"{base}/health").status_code == 200
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        llm.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model with the byte tokenizer, served with an API key."""
    d = tmp_path_factory.mktemp("tiny_server")
    make_model("base", vocab_size=261, max_position_embeddings=MAX_LEN).save_pretrained(d)
    write_byte_tokenizer(d)
    llm = LLM(d, max_memory="64MiB", max_model_len=MAX_LEN, max_num_seqs=16)
    with serving(llm, KEY) as base:
        yield llm, base


@pytest.fixture(scope="module")
def llm(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def base(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


# Pieces the rigged model emits one token each; their successor map spells a whole tool call.
PIECES = ['\n{"name": ', '"get_weather"', 'get_weather"', ', "arguments": ', '{"city": ', '"Paris"', '}}\n',
          ' {"city": ']
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def write_rigged_model(d) -> None:
    """A 1-layer model whose greedy output after `\\n` (the end of the generation prompt) is CALL_TEXT + EOS.

    Every block's output projection is zeroed, so the final hidden state is norm(embedding of the last token)
    and the next token depends on the last one alone. The byte tokenizer gets the call's pieces as extra
    (non-special) tokens so that each token of the call has a unique successor; `lm_head` row `next` gets the
    direction of `prev`'s hidden state for each (prev, next) pair, which makes `next` the argmax after `prev`."""
    write_byte_tokenizer(d)
    path = d / "tokenizer.json"
    data = json.loads(path.read_text())
    for t in data["added_tokens"]:  # as in Qwen's tokenizer: the tool-call tags are not special
        if t["content"] in ("<tool_call>", "</tool_call>"):
            t["special"] = False
    path.write_text(json.dumps(data))
    tok = HFTokenizer.from_file(str(path))
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in PIECES])
    tok.save(str(path))
    i = tok.token_to_id
    successor = {ord("\n"): i("<tool_call>"), i("<tool_call>"): i(PIECES[0]), i(PIECES[0]): i(PIECES[1]),
                 ord('"'): i(PIECES[2]),  # after tool_choice "required"'s forced `{"name": "`
                 ord(":"): i(PIECES[7]), i(PIECES[7]): i(PIECES[5]),  # after a named call's forced `"arguments":`
                 i(PIECES[1]): i(PIECES[3]), i(PIECES[2]): i(PIECES[3]), i(PIECES[3]): i(PIECES[4]),
                 i(PIECES[4]): i(PIECES[5]), i(PIECES[5]): i(PIECES[6]), i(PIECES[6]): i("</tool_call>"),
                 i("</tool_call>"): i("<|im_end|>")}
    model = make_model("base", vocab_size=tok.get_vocab_size(True), max_position_embeddings=MAX_LEN,
                       num_hidden_layers=1, mtp=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj", "down_proj.weight")):
                p.zero_()
        # Orthonormal embeddings for the rigged tokens and a unit final-norm gain keep their hidden states
        # orthogonal, so a row of lm_head can serve several predecessors (paths merge) without interference.
        sources = list(successor)
        basis = torch.linalg.qr(torch.randn(model.config.hidden_size, len(sources),
                                            generator=torch.Generator().manual_seed(0)))[0]
        model.model.embed_tokens.weight[sources] = basis.T
        model.model.norm.weight.zero_()
        model.lm_head.weight.zero_()
        for k, nxt in enumerate(successor.values()):
            model.lm_head.weight[nxt] += basis[:, k]
        ids = torch.tensor([sources])
        assert model(ids)[0].argmax(-1).tolist() == list(successor.values())  # the rig holds in a real forward
    model.save_pretrained(d)


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """The rigged model, served without an API key; yields an openai client and the base URL."""
    d = tmp_path_factory.mktemp("rigged_server")
    write_rigged_model(d)
    with serving(LLM(d, max_memory="32MiB", max_model_len=MAX_LEN, max_num_seqs=4), None) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0, timeout=60), url


def post(base: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return http().post(base + path, content=body, headers={**headers, "content-type": "application/json"}, **kw)
    return http().post(base + path, json=body, headers=headers, **kw)


def sse_events(lines) -> list[str]:
    """The `data:` payloads of an SSE stream, checking the framing (data lines separated by blank lines)."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        out.append(line[len("data: "):])
    return out


def greedy(max_tokens: int = 12, **extra) -> dict:
    return {"temperature": 0, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True, **extra}}


# ---- basics ----------------------------------------------------------------------------------------------------


def test_models_health_and_auth(base, client):
    assert http().get(f"{base}/health").json() == {"status": "ok"}  # open without a key
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
        r = http().get(f"{base}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert http().get(f"{base}/health").status_code == 200


def test_auth_off_accepts_any_or_no_key(rigged):
    _, url = rigged
    for key in (None, "whatever"):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}, key=key)
        assert r.status_code == 200, r.text


def test_chat_stream_equals_non_streamed_and_engine(llm, client):
    full = client.chat.completions.create(model=MODEL, messages=USER, **greedy())
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # the same request straight to the engine
    direct = llm.chat(USER, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert choice.message.content == direct.text
    assert full.usage.prompt_tokens == len(llm.chat_prompt(USER))
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                 stream_options={"include_usage": True}, **greedy()))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].choices == []
    no_details = {"prompt_tokens_details"}
    assert chunks[-1].usage.model_dump(exclude=no_details) == full.usage.model_dump(exclude=no_details)
    # the same prompt ran twice before: the prefix cache holds all of it but its last token
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens - 1


def test_raw_sse_framing_and_done(base):
    req = {"model": MODEL, "messages": USER, "max_tokens": 5, "stream": True,
           "stream_options": {"include_usage": True}}
    with http().stream("POST", f"{base}/v1/chat/completions", json=req,
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] >= 1
    assert all(o["object"] == "chat.completion.chunk" for o in objs)


def test_completions_prompt_forms_stream_and_logprobs(llm, client):
    ids = llm.tokenizer.encode("Once upon a time")
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", logprobs=3, **greedy())
    by_ids = client.completions.create(model=MODEL, prompt=ids, **greedy())
    direct = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == direct.text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 12
    lp = by_text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and 3 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()))  # greedy: the sampled token is the most likely one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    streamed = list(client.completions.create(model=MODEL, prompt="Once upon a time", stream=True, **greedy()))
    assert "".join(c.choices[0].text for c in streamed) == direct.text
    assert streamed[-1].choices[0].finish_reason == "length"

    batch = client.completions.create(model=MODEL, prompt=["Once upon a time", "Hello"], **greedy())
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == direct.text
    alone = client.completions.create(model=MODEL, prompt="Hello", **greedy())
    assert batch.choices[1].text == alone.choices[0].text


def test_chat_logprobs_n_seed_and_stop(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=2, n=2, **greedy(6))
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes and all(0 <= b < 256 for b in entry.bytes)

    sampled = [client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, top_p=0.9, seed=7,
                                              max_tokens=10, extra_body={"ignore_eos": True, "top_k": 50})
               for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content

    text = client.chat.completions.create(model=MODEL, messages=USER, **greedy(30)).choices[0].message.content
    tiny_t = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, temperature=1e-300,
                                            extra_body={"ignore_eos": True})
    assert tiny_t.choices[0].message.content == text  # a vanishing temperature is greedy, not NaN sampling
    stop = text[4:6]  # some two characters in the middle (several byte tokens)
    stopped = client.chat.completions.create(model=MODEL, messages=USER, stop=[stop, "never-there"], **greedy(30))
    assert stopped.choices[0].message.content == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_concurrent_streams_match_non_streamed(llm, client):
    prompts = [[{"role": "user", "content": f"question {i}: " + "why? " * (i % 5)}] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.text for o in llm.generate([llm.chat_prompt(m) for m in prompts], params)]

    def streamed(messages) -> str:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **greedy(10))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def full(messages) -> str:
        return client.chat.completions.create(model=MODEL, messages=messages, **greedy(10)).choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        a = list(pool.map(streamed, prompts))
        b = list(pool.map(full, prompts))
    assert a == expected and b == expected


def test_client_disconnect_aborts_and_frees_cache(llm, base):
    max_tokens = MAX_LEN - 100
    req = {"model": MODEL, "messages": USER, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with http().stream("POST", f"{base}/v1/chat/completions", json=req,
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        first = json.loads(next(r.iter_lines()).removeprefix("data: "))
        engine_req = llm.engine.requests.get(first["id"])  # the engine request behind this stream
        assert engine_req is not None
    # leaving the block closed the connection mid-stream
    assert engine_req.done.wait(30)
    out = engine_req.output()
    assert out.finish_reason == "abort" and len(out.token_ids) < max_tokens
    stats = llm.stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["free_slots"] == stats["total_slots"]
    assert http().get(f"{base}/health").status_code == 200


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_move_after_requests(base, client):
    names = ["qwen3next_requests_total", "qwen3next_prompt_tokens_total", "qwen3next_generation_tokens_total",
             "qwen3next_running_sequences", "qwen3next_waiting_sequences", "qwen3next_kv_blocks_used",
             "qwen3next_kv_blocks_total", "qwen3next_state_slots_used", "qwen3next_state_slots_total",
             "qwen3next_time_to_first_token_seconds", "qwen3next_inter_token_latency_seconds"]
    before = http().get(f"{base}/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    for name in names:
        assert f"# TYPE {name} " in before.text
    chat_ok = '{endpoint="/v1/chat/completions",status="200"}'
    client.chat.completions.create(model=MODEL, messages=USER, **greedy(5))
    post(base, "/v1/chat/completions", {"model": MODEL, "messages": USER, "temperature": -1})
    after = http().get(f"{base}/metrics").text
    assert _metric(after, "qwen3next_requests_total", chat_ok) == _metric(before.text, "qwen3next_requests_total",
                                                                          chat_ok) + 1
    bad = '{endpoint="/v1/chat/completions",status="400"}'
    assert _metric(after, "qwen3next_requests_total", bad) == _metric(before.text, "qwen3next_requests_total", bad) + 1
    for name, delta in [("qwen3next_generation_tokens_total", 5), ("qwen3next_time_to_first_token_seconds_count", 1),
                        ("qwen3next_inter_token_latency_seconds_count", 4)]:
        assert _metric(after, name) >= _metric(before.text, name) + delta, name
    assert _metric(after, "qwen3next_kv_blocks_total") > 0 and _metric(after, "qwen3next_state_slots_total") > 0


# ---- tool calls ------------------------------------------------------------------------------------------------


def test_rigged_model_tool_call_parsed(rigged):
    client, _ = rigged
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("auto", "required", named):
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=30)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", choice
        assert not c.message.content
        [call] = c.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # tool_choice none: no tools in the prompt, no parsing: the text comes back as it was generated
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", temperature=0,
                                       max_tokens=30)
    assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_rigged_model_tool_call_streamed(rigged):
    client, _ = rigged
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0,
                                                 max_tokens=30, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1
    call = calls[0]
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_rigged_model_tool_result_round_trip(rigged):
    client, _ = rigged
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=30)
    call = first.choices[0].message.tool_calls[0]
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    again = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=30)
    assert again.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_forced_call_cut_short_comes_back_as_content_and_follows_the_grammar(llm, client):
    """A random model under a forced tool_choice writes what the grammar allows (server/tools.py): the start of a
    call to the declared tool; cut by max_tokens, the unfinished call comes back as content, streamed or not."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    start = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, **greedy(20))
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason == "length"
    assert start.startswith(c.message.content) and len(c.message.content) > len("<tool_call>")
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named,
                                                 stream=True, **greedy(20)))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == c.message.content
    assert not any(d.tool_calls for d in deltas)
    required = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                              max_tokens=60, temperature=1.0, seed=0)
    content = required.choices[0].message.content or ""
    assert required.choices[0].message.tool_calls or (start.startswith(content) or content.startswith(start))


def test_tool_history_is_rendered_with_the_template(llm, client):
    history = [{"role": "system", "content": "Be brief."}, *USER,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, **greedy(3))
    rendered = llm.tokenizer.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(rendered))


# ---- errors ----------------------------------------------------------------------------------------------------

OK_CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**OK_CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": ["ok", ""]}, "stop"),
    ("/v1/chat/completions", {**OK_CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[0].content[0].type"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {**OK_CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**OK_CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10_000]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
])
def test_invalid_fields_are_400_naming_the_param(base, path, body, param):
    r = post(base, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert http().get(f"{base}/health").status_code == 200


def test_malformed_bodies_unknown_model_and_routes(base):
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"):
        r = post(base, "/v1/chat/completions", raw)
        assert r.status_code == 400, (raw, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for field in ("temperature", "repetition_penalty", "top_p"):  # Python's json accepts these literals
        for literal in ("NaN", "Infinity"):
            raw = json.dumps(OK_CHAT)[:-1] + f', "{field}": {literal}}}'
            r = post(base, "/v1/chat/completions", raw)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, literal, r.text)
    r = post(base, "/v1/chat/completions", {**OK_CHAT, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http().get(f"{base}/v1/nothing", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = http().get(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json() and r.headers["allow"] == "POST"
    assert http().get(f"{base}/health").status_code == 200


def test_lone_surrogates_are_a_400_naming_the_field_and_the_connection_stays(base):
    """JSON can spell a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text: a 400 naming the field, on a
    keep-alive connection that then serves the next request."""
    with httpx.Client(timeout=60) as client:
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        cases = [("/v1/chat/completions", json.dumps(OK_CHAT).replace("Paris", "Pa\\ud800ris"), "messages[0].content"),
                 ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "a\\udc00b"], "max_tokens": 1}', "prompt[1]"),
                 ("/v1/chat/completions", json.dumps({**OK_CHAT, "stop": ["x"]}).replace('"x"', '"\\ud83d"'),
                  "stop[0]")]
        for path, raw, param in cases:
            r = client.post(base + path, content=raw, headers=headers)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and "surrogate" in err["message"], err
        r = client.post(base + "/v1/chat/completions", json=OK_CHAT, headers=headers)
        assert r.status_code == 200 and r.headers.get("connection") != "close"


def test_context_limits_name_both_numbers(llm, base):
    long_prompt = "x" * (MAX_LEN + 50)
    r = post(base, "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 5})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt" and str(MAX_LEN) in err["message"] and str(MAX_LEN + 50) in err["message"]
    r = post(base, "/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": long_prompt}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    prompt_len = len(llm.chat_prompt(USER))
    r = post(base, "/v1/chat/completions", {**OK_CHAT, "max_tokens": MAX_LEN})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert str(MAX_LEN) in err["message"] and str(prompt_len) in err["message"]
    r = post(base, "/v1/chat/completions", {**OK_CHAT, "max_tokens": None, "max_completion_tokens": MAX_LEN})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    # exactly filling the context is fine
    r = post(base, "/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_LEN - 2), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert http().get(f"{base}/health").status_code == 200


def test_oversized_bodies_get_413(base):
    big = {**OK_CHAT, "messages": [{"role": "user", "content": "y" * (BODY_LIMIT + 10)}]}
    r = post(base, "/v1/chat/completions", big)  # Content-Length says it all
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the size is only known while reading
        data = json.dumps(big).encode()
        for k in range(0, len(data), 8192):
            yield data[k:k + 8192]

    r = http().post(f"{base}/v1/chat/completions", content=chunks(),
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413
    assert http().get(f"{base}/health").status_code == 200


def test_a_huge_declared_content_length_gets_413_at_once(base):
    """Headers only, declaring a gigabyte that never comes: answered before any body byte is read."""
    from urllib.parse import urlparse

    url = urlparse(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)  # the 10 s socket timeout fails the test if nothing comes
            assert chunk, "connection closed without a response"
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert http().get(f"{base}/health").status_code == 200


# ---- pieces without a server -----------------------------------------------------------------------------------


def test_prometheus_rendering():
    h = Histogram("lat_seconds", "Latency.", (0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    text = h.render()
    assert "# TYPE lat_seconds histogram" in text
    for line in ('lat_seconds_bucket{le="0.1"} 1', 'lat_seconds_bucket{le="1"} 3', 'lat_seconds_bucket{le="+Inf"} 4',
                 "lat_seconds_count 4", "lat_seconds_sum 4.05"):
        assert line in text.splitlines(), line
    c = Counter("hits_total", "Hits.", ("endpoint",))
    c.inc(endpoint='/a"b')
    c.inc(2, endpoint='/a"b')
    assert 'hits_total{endpoint="/a\\"b"} 3' in c.render().splitlines()
    with pytest.raises(ValueError, match="labels"):
        c.inc(other="x")
    with pytest.raises(ValueError, match="amount"):
        c.inc(-1, endpoint="x")


def test_serve_args():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.api_key, args.served_model_name) == ("127.0.0.1", 8000, None, None)
    args = parser.parse_args(["--model", "m", "--port", "0", "--max-num-seqs", "4", "--max-memory", "1GiB",
                              "--dtype", "bfloat16", "--threads", "2", "--api-key", "k"])
    assert (args.model, args.port, args.max_num_seqs, args.max_memory, args.dtype) == ("m", 0, 4, "1GiB", "bfloat16")
    for bad in (["--port", "70000"], ["--max-num-seqs", "0"], ["--dtype", "int3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_openapi_documents_what_the_server_sends(base):
    """/openapi.json: the 200 bodies (JSON and, for generation, server-sent events), the errors in OpenAI's shape with
    the codes the server really uses (400 for bad bodies, no 422), /metrics as text; and real responses validate
    against the documented models."""
    from qwen3next.server import protocol as P

    spec = http().get(f"{base}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and '"422"' not in json.dumps(spec["paths"])

    def ref(content, media="application/json"):
        return content[media]["schema"]["$ref"].rsplit("/", 1)[-1]

    for path, ok in (("/v1/chat/completions", "ChatCompletionResponse"), ("/v1/completions", "CompletionResponse")):
        responses = spec["paths"][path]["post"]["responses"]
        assert ref(responses["200"]["content"]) == ok and "text/event-stream" in responses["200"]["content"]
        assert all(ref(responses[c]["content"]) == "ErrorResponse" for c in ("400", "401", "404", "413", "503"))
    assert ref(spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]) == "ModelList"
    assert ref(spec["paths"]["/v1/models/{model}"]["get"]["responses"]["404"]["content"]) == "ErrorResponse"
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    # the documented models hold what the server sends
    P.ChatCompletionResponse.model_validate(post(base, "/v1/chat/completions", OK_CHAT).json())
    P.CompletionResponse.model_validate(post(base, "/v1/completions", {"model": MODEL, "prompt": "a",
                                                                        "max_tokens": 2}).json())
    P.ErrorResponse.model_validate(post(base, "/v1/chat/completions", {**OK_CHAT, "temperature": "hot"}).json())
    P.ErrorResponse.model_validate(post(base, "/v1/chat/completions", OK_CHAT, key="wrong").json())
    P.ModelList.model_validate(http().get(f"{base}/v1/models", headers={"authorization": f"Bearer {KEY}"}).json())
    P.HealthStatus.model_validate(http().get(f"{base}/health").json())
    r = http().get(f"{base}/metrics")
    assert r.headers["content-type"].startswith("text/plain") and "qwen3next_" in r.text
