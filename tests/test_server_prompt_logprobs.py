"""Prompt logprobs through the server: `/v1/completions` with `echo` and `logprobs` (what lm-evaluation-harness's
`local-completions` model sends for loglikelihood tasks), `max_tokens: 0`, batched token prompts, streaming and
n > 1, checked with the official `openai` client against the log-softmax of a plain forward; bad input is a 400."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from test_server import KEY, MAX_LEN, MODEL, http, serving

from qwen3next.engine.llm import LLM
from tiny_models import make_model, write_byte_tokenizer

TOL = 1e-4
TEXT = "It is a truth universally acknowledged, that a single man"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(plain model, llm, openai client, base URL): a tiny random model with the byte tokenizer (one token per
    ASCII character), prefill chunks of 16 so prompts span several steps."""
    d = tmp_path_factory.mktemp("tiny_prompt_logprobs")
    model = make_model("base", vocab_size=261, max_position_embeddings=MAX_LEN)
    model.save_pretrained(d)
    write_byte_tokenizer(d)
    llm = LLM(d, max_memory="64MiB", max_model_len=MAX_LEN, max_num_seqs=8, prefill_chunk_size=16)
    with serving(llm, KEY) as base:
        yield model, llm, openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60), base


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def assert_echoed_prompt(lp, model, llm, ids: list[int], top_n: int) -> None:
    """The first len(ids) entries of legacy logprobs: the prompt's tokens, null for the first one, then each
    token's logprob given the ones before it with the top `top_n` alternatives (the token itself always among
    them), character offsets from 0."""
    ref = full_forward_logprobs(model, ids)
    P = len(ids)
    assert lp.tokens[:P] == [llm.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:P] == pytest.approx([ref[p - 1, ids[p]].item() for p in range(1, P)], abs=TOL)
    for p in range(1, P):
        top = lp.top_logprobs[p]
        token = llm.tokenizer.decode([ids[p]])
        assert top[token] == pytest.approx(ref[p - 1, ids[p]].item(), abs=TOL)
        want = sorted({ids[p], *ref[p - 1].topk(top_n).indices.tolist()})
        assert sorted(top.values()) == pytest.approx(sorted(ref[p - 1, want].tolist()), abs=TOL)
    assert lp.text_offset[:P] == list(range(P))  # one ASCII character per byte token


def test_echo_logprobs_max_tokens_zero_equal_a_plain_forward(served):
    model, llm, client, _ = served
    r = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=5, max_tokens=0)
    ids = llm.tokenizer.encode(TEXT)
    c = r.choices[0]
    assert c.text == TEXT and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(ids)
    assert_echoed_prompt(c.logprobs, model, llm, ids, 5)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)


def test_echo_logprobs_then_generated_tokens(served):
    """What lm-eval's local-completions sends: a batch of token-id prompts, echo, logprobs 1, max_tokens 1,
    temperature 0; each choice holds its prompt's logprobs and then the generated token's, which equal those of
    the same request without echo."""
    model, llm, client, _ = served
    prompts = [llm.tokenizer.encode(TEXT), llm.tokenizer.encode("Emma Woodhouse, handsome, clever, and rich")]
    r = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0,
                                  seed=1234)
    plain = client.completions.create(model=MODEL, prompt=prompts, logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, c, p in zip(prompts, sorted(r.choices, key=lambda c: c.index), sorted(plain.choices,
                                                                                   key=lambda c: c.index)):
        assert len(c.logprobs.token_logprobs) == len(ids) + 1
        assert_echoed_prompt(c.logprobs, model, llm, ids, 1)
        assert c.text == llm.tokenizer.decode(ids) + p.text
        assert c.logprobs.tokens[-1:] == p.logprobs.tokens
        assert c.logprobs.token_logprobs[-1] == pytest.approx(p.logprobs.token_logprobs[0], abs=TOL)
        assert c.logprobs.text_offset[-1] == len(ids)


def test_streamed_echo_with_logprobs_and_n_matches_the_whole_response(served):
    model, llm, client, _ = served
    kw = dict(model=MODEL, prompt=TEXT, echo=True, logprobs=2, max_tokens=6, temperature=0, n=2,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    texts, tokens, lps = {}, {}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs is not None:
                tokens[c.index] = tokens.get(c.index, []) + c.logprobs.tokens
                lps[c.index] = lps.get(c.index, []) + c.logprobs.token_logprobs
    ids = llm.tokenizer.encode(TEXT)
    for c in whole.choices:
        assert_echoed_prompt(c.logprobs, model, llm, ids, 2)
        assert texts[c.index] == c.text and c.text.startswith(TEXT)
        assert tokens[c.index] == c.logprobs.tokens and len(tokens[c.index]) == len(ids) + 6
        assert lps[c.index][0] is None
        assert lps[c.index][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=TOL)


@pytest.mark.parametrize("body,param", [
    ({"prompt": TEXT, "echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
    ({"prompt": TEXT, "echo": True, "logprobs": -1, "max_tokens": 0}, "logprobs"),
    ({"prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": -1}, "max_tokens"),
    ({"prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 0, "n": 2}, "n"),  # n identical prefills
    ({"prompt": "x" * (MAX_LEN + 1), "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
    ({"prompt": "x" * MAX_LEN, "echo": True, "logprobs": 1, "max_tokens": 1}, "prompt"),
])
def test_bad_prompt_logprob_requests_are_400_and_the_server_goes_on(served, body, param):
    _, _, client, base = served
    r = http().post(f"{base}/v1/completions", content=json.dumps({"model": MODEL, **body}),
                    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, **body)
    ok = client.completions.create(model=MODEL, prompt="ab", echo=True, logprobs=0, max_tokens=0)
    assert ok.choices[0].text == "ab" and ok.choices[0].logprobs.token_logprobs[0] is None


def test_whole_context_prompt_with_max_tokens_zero(served):
    """A prompt as long as the context is scored when nothing is generated."""
    model, llm, client, _ = served
    text = ("Pride and Prejudice. " * 60)[:MAX_LEN]
    r = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == MAX_LEN and r.choices[0].text == text
    ids = llm.tokenizer.encode(text)
    ref = full_forward_logprobs(model, ids)
    assert lp.token_logprobs[1:] == pytest.approx([ref[p - 1, ids[p]].item() for p in range(1, MAX_LEN)], abs=TOL)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])


def test_echo_of_partial_prompt_logprobs_keeps_every_token(served):
    """A request aborted mid-prefill has prompt logprobs for a prefix only: the echo keeps the whole prompt, the
    positions without logprobs null."""
    from qwen3next.engine.output import Logprob
    from qwen3next.server.app import OpenAIServer

    _, llm, _, _ = served
    server = OpenAIServer(llm, MODEL)
    ids = llm.tokenizer.encode("abcde")
    partial = [None, {ids[1]: Logprob(-1.5, 3)}, {ids[2]: Logprob(-0.5, 1)}]  # positions 3, 4 never computed
    lp = server._echo_logprobs(ids, partial)
    assert lp.tokens == list("abcde") and lp.text_offset == [0, 1, 2, 3, 4]
    assert lp.token_logprobs == [None, -1.5, -0.5, None, None]
    assert lp.top_logprobs == [None, {"b": -1.5}, {"c": -0.5}, None, None]
    assert server._echo_logprobs(ids, []).token_logprobs == [None] * 5  # none at all (aborted before any)
