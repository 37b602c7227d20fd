"""Structured output and tool calls through the server, driven by the official `openai` client against the demo
model on loopback: `chat.completions.parse` with a Pydantic model, json_object, vLLM's structured_outputs /
guided_* fields on both endpoints, and tool_choice required / named / auto returning only declared tools with
schema-valid arguments, 20 of 20 samples at temperature 1."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_server import http, serving

from qwen3next import DEFAULT_MODEL
from qwen3next.engine.llm import LLM

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="demo model not built")

MODEL = "tiny"  # the name test_server's `serving` serves under
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
BOOK_TOOL = {"type": "function", "function": {
    "name": "lookup_book", "description": "Find a book by its title.",
    "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}},
                   "required": ["title"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, BOOK_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
N = 20


class Weather(BaseModel):
    city: str = Field(max_length=24)
    temperature: int = Field(ge=-60, le=60)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def client():
    llm = LLM(DEFAULT_MODEL, max_memory="128MiB", max_model_len=1024, max_num_seqs=N)
    with serving(llm, None) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120), base


def test_parse_with_a_pydantic_model_20_of_20_at_temperature_1(client):
    c, _ = client
    r = c.chat.completions.parse(model=MODEL, messages=ASK, response_format=Weather, temperature=1.0, n=N,
                                 max_tokens=64, seed=0)
    assert len(r.choices) == N
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Weather)
    assert len({ch.message.content for ch in r.choices}) > 1


def test_json_object_always_parses(client):
    c, _ = client
    r = c.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                  temperature=1.0, n=8, max_tokens=200, seed=1)
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert any(ch.finish_reason == "stop" for ch in r.choices)


def test_vllm_fields_on_both_endpoints_and_streamed(client):
    c, _ = client
    r = c.completions.create(model=MODEL, prompt="The answer is", max_tokens=10, n=4, temperature=1.0,
                             extra_body={"guided_choice": ["yes", "no"]})
    assert {ch.text for ch in r.choices} <= {"yes", "no"}
    r = c.completions.create(model=MODEL, prompt="Call me at", max_tokens=16, temperature=1.0,
                             extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", r.choices[0].text)
    strict = {**Weather.model_json_schema(), "additionalProperties": False}
    stream = c.chat.completions.create(model=MODEL, messages=ASK, stream=True, max_tokens=64, temperature=1.0,
                                       seed=2, extra_body={"guided_json": strict})
    Weather.model_validate_json("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_are_declared_and_valid_20_of_20(client, choice):
    c, _ = client
    tool_choice = ({"type": "function", "function": {"name": "lookup_book"}} if choice == "named" else "required")
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, n=N,
                                  temperature=1.0, max_tokens=120, seed=3)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls", ch.message.content
        assert ch.message.tool_calls and not ch.message.content
        for call in ch.message.tool_calls:
            assert call.function.name in (["lookup_book"] if choice == "named" else SCHEMAS)
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        if choice == "named":
            assert len(ch.message.tool_calls) == 1


def test_required_without_parallel_calls_returns_one_call(client):
    c, _ = client
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=6,
                                  parallel_tool_calls=False, temperature=1.0, max_tokens=120, seed=4)
    assert all(len(ch.message.tool_calls) == 1 and ch.finish_reason == "tool_calls" for ch in r.choices)


def test_auto_never_returns_an_undeclared_name(client):
    """Declared tools that do not fit the question: whatever the model writes, a call it returns is declared."""
    c, _ = client
    tools = [BOOK_TOOL]
    calls = 0
    for stream in (False, True):
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=tools, n=N, temperature=1.0,
                                      max_tokens=120, seed=5, stream=stream)
        if stream:
            deltas = [ch.choices[0].delta for ch in r if ch.choices]
            found = [tc.function for d in deltas for tc in d.tool_calls or []]
            text = "".join(d.content or "" for d in deltas)
        else:
            found = [tc.function for ch in r.choices for tc in ch.message.tool_calls or []]
            text = "".join(ch.message.content or "" for ch in r.choices)
        for f in found:
            assert f.name == "lookup_book"
            jsonschema.validate(json.loads(f.arguments), SCHEMAS["lookup_book"])
        assert "<tool_call>" not in text  # an opened call is always completed into a declared one
        calls += len(found)
    assert calls > 0  # the demo model does call tools here


def test_constraint_errors_are_400s_naming_the_field(client):
    _, base = client
    url = f"{base}/v1/chat/completions"
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    cases = [({"response_format": {"type": "json_schema"}}, "response_format"),
             ({"response_format": {"type": "yaml"}}, "response_format.type"),
             ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
             ({"guided_regex": "(unclosed"}, "guided_regex"),
             ({"structured_outputs": {"jsn": {}}}, "structured_outputs"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
              "response_format"),
             ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
             # a constraint of its own: only a JSON answer combines with tools ("auto": that JSON or calls)
             ({"tools": [WEATHER_TOOL], "guided_choice": ["yes", "no"]}, "guided_choice"),
             ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
              "response_format")]
    for extra, param in cases:
        r = http().post(url, json={**body, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())
    assert http().post(url, json=body).status_code == 200  # still serving


def test_langchain_with_structured_output_in_both_modes_and_bound_tools(client):
    """LangChain's ChatOpenAI against the server: `with_structured_output` by json_schema (its default: our
    response_format) and by function_calling (a named tool_choice), and `bind_tools(tool_choice=NAME)`."""
    langchain_openai = pytest.importorskip("langchain_openai")
    _, base = client
    chat = langchain_openai.ChatOpenAI(base_url=f"{base}/v1", api_key="none", model=MODEL, temperature=1.0,
                                       max_tokens=96, max_retries=0, timeout=120)
    for method in ("json_schema", "function_calling"):
        structured = chat.with_structured_output(Weather, method=method)
        for _ in range(3):
            assert isinstance(structured.invoke("What is the weather in Paris?"), Weather), method

    def lookup_book(title: str) -> str:
        """Find a book by its title."""
        return title

    bound = chat.bind_tools([lookup_book], tool_choice="lookup_book")
    msg = bound.invoke("What is the weather in Paris?")
    [call] = msg.tool_calls
    assert call["name"] == "lookup_book" and isinstance(call["args"]["title"], str)


class Item(BaseModel):
    name: str = Field(max_length=12)
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    """Order books."""

    items: list[Item] = Field(min_length=1, max_length=2)


def test_tool_parameters_with_refs_and_answer_or_calls(client):
    """The OpenAI SDK's tool of a nested Pydantic model keeps `$defs` / `$ref` in its parameters: every call
    validates against it. With tool_choice "auto" and a response_format, the reply is that JSON or calls."""
    c, _ = client
    tool = openai.pydantic_function_tool(Order)
    assert "$defs" in tool["function"]["parameters"]
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], tool_choice="required", n=6,
                                  temperature=1.0, max_tokens=120, seed=6)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls"
        for call in ch.message.tool_calls:
            Order.model_validate_json(call.function.arguments)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], n=6, temperature=1.0, max_tokens=120,
                                  seed=7, response_format={"type": "json_schema", "json_schema": {
                                      "name": "weather", "schema": Weather.model_json_schema()}})
    for ch in r.choices:
        if ch.message.tool_calls:
            assert ch.finish_reason == "tool_calls"
            Order.model_validate_json(ch.message.tool_calls[0].function.arguments)
        else:
            assert ch.finish_reason == "stop"
            Weather.model_validate_json(ch.message.content)


def test_auto_text_cannot_spell_the_call_tag():
    """Under "auto", free text may not write `<tool_call>` in ordinary tokens (which the output parser would read
    as a call that escaped the grammar), while the tag token itself opens a constrained call."""
    from qwen3next.engine.structured import GrammarCompiler
    from qwen3next.server import protocol as P
    from qwen3next.server.tools import tool_grammar
    from qwen3next.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    compiler = GrammarCompiler(tok.backend.to_str(), 8256, tok.eos_token_ids)
    grammar = tool_grammar([P.Tool.model_validate(WEATHER_TOOL)], "auto", True, True)
    from qwen3next.engine.sampling import StructuredOutputsParams

    spelled = tok.encode("Sure. <tool") + tok.encode("_call>")
    assert tok.token_to_id("<tool_call>") not in spelled
    m = compiler.matcher(StructuredOutputsParams(grammar=grammar))
    assert m.valid_prefix(spelled) < len(spelled)
    real = tok.encode('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert tok.token_to_id("<tool_call>") in real
    assert m.valid_prefix(real) == len(real)
    undeclared = tok.encode('Sure. <tool_call>\n{"name": "calculator"')
    assert m.valid_prefix(undeclared) < len(undeclared)
