"""Parsing of Qwen/Hermes-style tool calls in model output, for a whole text or for streamed deltas.

The format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call. Only the standard
library is imported here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


def _parse_call_body(body: str) -> dict[str, Any] | None:
    """`{"name": str, "arguments": dict}` from a block's JSON, or None when the block is not a valid call.

    `arguments` may be missing ({}), an object, or a string holding a JSON object (some models double-encode)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split model output into (content, tool calls).

    Every `<tool_call>{json}</tool_call>` block holding a valid call is removed from the text and returned as
    `{"name": ..., "arguments": {...}}`; blocks with malformed JSON or no name stay in the content verbatim.
    The content is stripped of surrounding whitespace. Never raises on model output."""
    calls: list[dict[str, Any]] = []
    pieces: list[str] = []
    pos = 0
    for m in _TOOL_CALL_RE.finditer(text):
        call = _parse_call_body(m.group(1))
        if call is None:
            continue
        pieces.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    pieces.append(text[pos:])
    return "".join(pieces).strip(), calls


@dataclass(frozen=True)
class ContentEvent:
    """Plain assistant text to forward to the client."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """One complete, valid tool call; `index` counts the calls of this response from 0."""

    index: int
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """Arguments as the JSON string OpenAI's `function.arguments` carries."""
        return json.dumps(self.arguments, ensure_ascii=False)


class StreamingToolCallParser:
    """Incremental `parse_tool_calls` for streamed output.

    `feed(delta)` and `finish()` return lists of events:
    - `ContentEvent(text)`: text outside tool calls, sent as soon as it cannot be the start of `<tool_call>`.
      Whitespace is held until non-whitespace content follows, so content is stripped like `parse_tool_calls`.
    - `ToolCallEvent(index, name, arguments)`: emitted when a call's `</tool_call>` arrives and its JSON is valid
      (a call is emitted whole, never half, so a malformed one can still be returned as text).
    A malformed block, and at `finish()` an unterminated one or a held partial `<tool_call` prefix, comes out as
    content. Over any split of a text into deltas, the events equal `parse_tool_calls(text)`: joined content
    events give its content and the tool-call events its calls.
    """

    def __init__(self) -> None:
        self._buf = ""  # unprocessed text: a possible tag prefix, or the body of an open call
        self._in_call = False
        self._pending_ws = ""  # whitespace held until non-whitespace content follows
        self._started = False  # some non-whitespace content has been emitted
        self._num_calls = 0

    @property
    def num_tool_calls(self) -> int:
        return self._num_calls

    def _content(self, text: str, events: list[ContentEvent | ToolCallEvent]) -> None:
        # Emit `text`, deferring trailing whitespace and dropping leading whitespace (the batch parser strips).
        if not text:
            return
        body = text.rstrip()
        trailing = text[len(body) :]
        if body:
            lead = self._pending_ws if self._started else ""
            if not self._started:
                body = body.lstrip()
            events.append(ContentEvent(lead + body))
            self._started = True
            self._pending_ws = trailing
        else:
            self._pending_ws += trailing

    def feed(self, delta: str) -> list[ContentEvent | ToolCallEvent]:
        """Consume a text delta; return the events it completes."""
        events: list[ContentEvent | ToolCallEvent] = []
        self._buf += delta
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    return events
                body = self._buf[:end]
                self._buf = self._buf[end + len(TOOL_CALL_END) :]
                self._in_call = False
                call = _parse_call_body(body)
                if call is None:
                    self._content(TOOL_CALL_START + body + TOOL_CALL_END, events)
                else:
                    events.append(ToolCallEvent(self._num_calls, call["name"], call["arguments"]))
                    self._num_calls += 1
            else:
                start = self._buf.find(TOOL_CALL_START)
                if start >= 0:
                    self._content(self._buf[:start], events)
                    self._buf = self._buf[start + len(TOOL_CALL_START) :]
                    self._in_call = True
                    continue
                # Hold back the longest tail that could still grow into "<tool_call>".
                keep = 0
                for n in range(min(len(TOOL_CALL_START) - 1, len(self._buf)), 0, -1):
                    if TOOL_CALL_START.startswith(self._buf[-n:]):
                        keep = n
                        break
                self._content(self._buf[: len(self._buf) - keep], events)
                self._buf = self._buf[len(self._buf) - keep :]
                return events

    def finish(self) -> list[ContentEvent | ToolCallEvent]:
        """End of stream: flush a held prefix or an unterminated call as content."""
        events: list[ContentEvent | ToolCallEvent] = []
        rest = (TOOL_CALL_START if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        self._content(rest, events)
        self._pending_ws = ""
        return events
