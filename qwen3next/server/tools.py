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
from .structured import RequestConstraint


@dataclass
class ToolSetup:
    tools: list[dict] | None = None  # what the chat template sees
    parse: bool = False  # parse <tool_call> blocks out of the output
    names: frozenset[str] = field(default_factory=frozenset)  # the declared tools: only these become calls
    constraint: StructuredOutputsParams | None = None  # the grammar decoding follows


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _schema(schema: dict) -> str:
    """A JSON schema for Lark's `%json`, closed (`closed_objects`) and in the chat format's JSON style."""
    return json.dumps({**closed_objects(schema), "x-guidance": JSON_STYLE})


def tool_grammar(tools: list[P.Tool], mode: str, parallel: bool, tag_tokens: bool,
                 answer_schema: dict | None = None, free_tokens: tuple[str, ...] = ()) -> str:
    """The Lark grammar (llguidance's dialect) of a reply under `tool_choice` mode "required", "named" (`tools` is
    then the named one) or "auto".

    A call is `{"name": N, "arguments": A}` for a declared N, with A valid for N's parameters: one rule per tool, its
    start forced as text and its arguments a `%json` of the tool's own schema (so `$ref`s into its `$defs` resolve).
    `tag_tokens`: the call tags are single tokens (written `<tool_call>`), else text. "auto": free text, in which
    the tag cannot be spelled out in ordinary tokens either, and the special tokens `free_tokens` (e.g. `<think>`,
    `</think>` of a thinking model) may appear; with `answer_schema`, the reply is that JSON or calls."""
    start, end = ("<tool_call>", "</tool_call>") if tag_tokens else (json.dumps(TOOL_CALL_START),
                                                                    json.dumps(TOOL_CALL_END))
    rules = [f'call: {start} "\\n" ({" | ".join(f"tool_{i}" for i in range(len(tools)))}) "\\n" {end}']
    for i, t in enumerate(tools):
        head = '{"name": ' + json.dumps(t.function.name, ensure_ascii=False) + ', "arguments": '
        rules.append(f'tool_{i}: {json.dumps(head)} %json {_schema(t.function.parameters or {"type": "object"})} "}}"')
    calls = 'call ("\\n" call)*' if parallel and mode != "named" else "call"
    if mode != "auto":
        return "\n".join([f"start: {calls}", *rules])
    if answer_schema is not None:
        return "\n".join([f"start: %json {_schema(answer_schema)} | {calls}", *rules])
    specials = "".join(f" | {tok}" for tok in free_tokens)
    free = f"free: TEXT? (({specials[3:]}) TEXT?)*" if free_tokens else "free: TEXT?"
    tag = TOOL_CALL_START.replace("/", "\\/")
    return "\n".join([f"start: free (call free){'*' if parallel else '?'}", free,
                      f"TEXT: /(.|\\n)+/ & ~/(.|\\n)*{tag}(.|\\n)*/", *rules])


def tool_setup(req: P.ChatCompletionRequest, tag_tokens: bool, wanted: RequestConstraint | None = None,
               free_tokens: tuple[str, ...] = ()) -> ToolSetup:
    """What the template, the decoding constraint and the parser do with the request's tools. `tag_tokens`: the
    tokenizer has `<tool_call>` and `</tool_call>` as tokens; `wanted`: the request's own output constraint
    (response_format, guided_*), which combines with tool_choice "auto" when it is a JSON schema (the reply is that
    JSON or calls) and with nothing else (a 400); `free_tokens`: special tokens "auto" text may hold."""
    wanted = wanted or RequestConstraint()
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if names else "none")
    if not names:
        if choice in ("required",) or isinstance(choice, P.NamedToolChoice):
            raise APIError(400, "tool_choice requires tools", "tool_choice")
        return ToolSetup(constraint=wanted.params)
    if choice == "none":
        return ToolSetup(constraint=wanted.params)
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
    if wanted.params is not None and mode != "auto":
        which = "a named function" if mode == "named" else "'required'"
        raise APIError(400, f"{wanted.field} cannot apply with tool_choice {which}: the reply is tool calls",
                       wanted.field)
    if wanted.params is not None and wanted.answer_schema is None:
        raise APIError(400, f"{wanted.field}: only a JSON schema (response_format json_object / json_schema, "
                            f"guided_json) combines with tools; the reply is then that JSON or tool calls",
                       wanted.field)
    if mode == "auto" and not tag_tokens:  # "auto" cannot be held to the tools; a JSON answer still can
        return ToolSetup(tools, True, frozenset(names), wanted.params)
    grammar = tool_grammar(chosen, mode, req.parallel_tool_calls, tag_tokens, wanted.answer_schema, free_tokens)
    return ToolSetup(tools, True, frozenset(names), StructuredOutputsParams(grammar=grammar))


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
