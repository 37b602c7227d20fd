"""Tool calls in chat completions.

Tool calls use the Qwen/Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`). Decoding is
not constrained, so `tool_choice` "required" or a named function is enforced by writing the start of a call
after the generation prompt (`<tool_call>\\n{"name": "` or `<tool_call>\\n{"name": "NAME", "arguments":`) and
parsing the completion as if the model had written that prefix. A call whose JSON is malformed comes back as
text content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..tool_calls import TOOL_CALL_START, ContentEvent, StreamingToolCallParser, ToolCallEvent, parse_tool_calls
from . import protocol as P
from .errors import APIError


def named_call_prefix(name: str) -> str:
    """The forced start of a call to `name` (`tool_choice` naming a function). It stops right after `"arguments":`
    with no space: byte-level BPE tokenizes a call's `": {"` as `":` + ` {"`, so a prefix ending in a space would end
    in a token the model never produces there (the demo model then derailed in 20 of 20 samples at T=1)."""
    return TOOL_CALL_START + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments":'


@dataclass
class ToolSetup:
    tools: list[dict] | None = None  # what the chat template sees
    parse: bool = False  # parse <tool_call> blocks out of the output
    prefix: str = ""  # forced start of a call, appended after the generation prompt


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_setup(req: P.ChatCompletionRequest) -> ToolSetup:
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if names else "none")
    if not names:
        if choice in ("required",) or isinstance(choice, P.NamedToolChoice):
            raise APIError(400, "tool_choice requires tools", "tool_choice")
        return ToolSetup()
    if choice == "none":
        return ToolSetup()
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "auto":
        return ToolSetup(tools, True)
    if choice == "required":
        return ToolSetup(tools, True, TOOL_CALL_START + '\n{"name": "')
    name = choice.function.name
    if name not in names:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools ({names})",
                       "tool_choice")
    return ToolSetup(tools, True, named_call_prefix(name))


def message_tool_calls(setup: ToolSetup, text: str, parallel_tool_calls: bool) -> tuple[str | None, list[P.ToolCall]]:
    """The content and tool calls of a finished chat sample's message."""
    content: str | None = text
    calls: list[P.ToolCall] = []
    if setup.parse:
        content, parsed = parse_tool_calls(setup.prefix + text)
        calls = [P.ToolCall(id=call_id(), function=P.FunctionCall(
            name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))) for c in parsed]
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
        if self._parser is not None:
            self._parser.feed(setup.prefix)  # the forced start of a call: nothing comes out until it closes
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
                elif isinstance(e, ToolCallEvent) and (self._parallel or self.num_calls == 0):
                    deltas.append(P.DeltaMessage(tool_calls=[P.ToolCallDelta(
                        index=self.num_calls, id=call_id(), type="function",
                        function=P.FunctionCallDelta(name=e.name, arguments=e.arguments_json))]))
                    self.num_calls += 1
        return deltas
