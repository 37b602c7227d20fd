"""Tool calls in chat completions, guaranteed by a grammar.

Tool calls use the Qwen/Hermes format (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`). The
request's tools become a constraint on decoding (engine/structured.py): each call is `{"name": N, "arguments": A}`
where N is a declared tool's name and A validates against that tool's parameter schema.
- `tool_choice` "required": the reply is one or more calls (one when `parallel_tool_calls` is false);
- a named function: the reply is one call of it;
- "auto": free text, but once the model opens `<tool_call>` the call is held to the declared tools; at most one
  call without `parallel_tool_calls`. With a `response_format` too, the reply is either that JSON or calls.
The lazy "auto" grammar needs `<tool_call>` / `</tool_call>` to be tokens of their own (as in Qwen's tokenizers):
otherwise free text could spell the tag, and "auto" is left unconstrained. The output is parsed back into calls;
a call to an undeclared name (possible only then) stays in the content as text, never comes back as a call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine.sampling import StructuredOutputsParams
from ..engine.structured import JSON_STYLE, closed_objects
from ..tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ContentEvent,
    StreamingToolCallParser,
    ToolCallEvent,
    parse_tool_calls,
)
from . import protocol as P
from .errors import APIError


@dataclass
class ToolSetup:
    tools: list[dict] | None = None  # what the chat template sees
    parse: bool = False  # parse <tool_call> blocks out of the output
    names: frozenset[str] = field(default_factory=frozenset)  # the declared tools: only these become calls
    constraint: StructuredOutputsParams | None = None  # the grammar decoding follows


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_schema(tools: list[P.Tool]) -> dict:
    """The JSON schema of one call: the name of a declared tool and arguments valid for that tool."""
    variants = [{"type": "object", "properties": {
        "name": {"const": t.function.name},
        "arguments": closed_objects(t.function.parameters or {"type": "object"})},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": JSON_STYLE}


def tool_grammar(tools: list[P.Tool], mode: str, parallel: bool, tag_tokens: bool,
                 answer_schema: dict | None = None) -> str:
    """The Lark grammar (llguidance's dialect) of a reply under `tool_choice` mode "required", "named" (`tools` is
    then the named one) or "auto"; `tag_tokens`: the call tags are single tokens (written `<tool_call>`), else
    text. `answer_schema`: with "auto", the reply is that JSON or calls."""
    start, end = ("<tool_call>", "</tool_call>") if tag_tokens else (json.dumps(TOOL_CALL_START),
                                                                    json.dumps(TOOL_CALL_END))
    rules = [f'call: {start} "\\n" %json {json.dumps(_call_schema(tools))} "\\n" {end}']
    calls = 'call ("\\n" call)*' if parallel and mode != "named" else "call"
    if mode != "auto":
        return "\n".join([f"start: {calls}", *rules])
    if answer_schema is not None:
        answer = {**closed_objects(answer_schema), "x-guidance": JSON_STYLE}
        return "\n".join([f"start: %json {json.dumps(answer)} | {calls}", *rules])
    more = "*" if parallel else "?"
    return "\n".join([f"start: TEXT? (call TEXT?){more}", "TEXT: /(.|\\n)+/", *rules])


def tool_setup(req: P.ChatCompletionRequest, tag_tokens: bool, answer_schema: dict | None = None) -> ToolSetup:
    """What the template, the decoding constraint and the parser do with the request's tools. `tag_tokens`: the
    tokenizer has `<tool_call>` and `</tool_call>` as tokens; `answer_schema`: the response_format's schema."""
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if names else "none")
    if not names:
        if choice in ("required",) or isinstance(choice, P.NamedToolChoice):
            raise APIError(400, "tool_choice requires tools", "tool_choice")
        return ToolSetup()
    if choice == "none":
        return ToolSetup()
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise APIError(400, f"tools: the function name {dup!r} is declared twice", "tools")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    chosen, mode = req.tools, choice
    if isinstance(choice, P.NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools ({names})",
                           "tool_choice")
        chosen, mode = [t for t in req.tools if t.function.name == name], "named"
    constraint = None
    if mode != "auto" or tag_tokens:
        grammar = tool_grammar(chosen, mode, req.parallel_tool_calls, tag_tokens, answer_schema)
        constraint = StructuredOutputsParams(grammar=grammar)
    return ToolSetup(tools, True, frozenset(names), constraint)


def _as_text(name: str, arguments: dict) -> str:
    """A parsed call written back as the block it came from (a call to an undeclared name stays content)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def message_tool_calls(setup: ToolSetup, text: str, parallel_tool_calls: bool) -> tuple[str | None, list[P.ToolCall]]:
    """The content and tool calls of a finished chat sample's message."""
    content: str | None = text
    calls: list[P.ToolCall] = []
    if setup.parse:
        content, parsed = parse_tool_calls(text)
        undeclared = [c for c in parsed if c["name"] not in setup.names]
        if undeclared:  # possible only without a grammar: leave them in the text
            content = "\n".join([content, *(_as_text(c["name"], c["arguments"]) for c in undeclared)]).strip()
        calls = [P.ToolCall(id=call_id(), function=P.FunctionCall(
            name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False)))
            for c in parsed if c["name"] in setup.names]
        if not parallel_tool_calls:
            calls = calls[:1]
        if calls and not content:
            content = None
    return content, calls


class ToolCallStream:
    """The deltas of one streamed chat sample: its text as content or, when tools are parsed, its content and tool
    calls as they close."""

    def __init__(self, setup: ToolSetup, parallel_tool_calls: bool):
        self._parser = StreamingToolCallParser() if setup.parse else None
        self._names = setup.names
        self._parallel = parallel_tool_calls
        self.num_calls = 0

    def deltas(self, text: str, finished: bool) -> list[P.DeltaMessage]:
        deltas: list[P.DeltaMessage] = []
        parser = self._parser
        if parser is None:
            if text:
                deltas.append(P.DeltaMessage(content=text))
        else:
            events = parser.feed(text) + (parser.finish() if finished else [])
            for e in events:
                if isinstance(e, ContentEvent):
                    deltas.append(P.DeltaMessage(content=e.text))
                elif isinstance(e, ToolCallEvent) and e.name not in self._names:
                    deltas.append(P.DeltaMessage(content=_as_text(e.name, e.arguments)))
                elif isinstance(e, ToolCallEvent) and (self._parallel or self.num_calls == 0):
                    deltas.append(P.DeltaMessage(tool_calls=[P.ToolCallDelta(
                        index=self.num_calls, id=call_id(), type="function",
                        function=P.FunctionCallDelta(name=e.name, arguments=e.arguments_json))]))
                    self.num_calls += 1
        return deltas
