"""Runtime tokenizer: `tokenizer.json` through `tokenizers`, chat templates through sandboxed jinja2, and the
parsing of Qwen/Hermes-style `<tool_call>` blocks (whole text or streamed deltas).

Only `tokenizers`, `jinja2` and the standard library are imported here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Qwen ChatML (SPEC §12.2). Written for qwen3next; its output is the Qwen3 Instruct format. Raw string: the `\n`
# escapes are Jinja string-literal escapes.
DEFAULT_CHAT_TEMPLATE = r"""{#- Qwen ChatML chat template (qwen3next built-in). -#}
{%- macro text_of(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content | tojson -}}
    {%- else -%}
        {{- content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') -}}
    {%- endif -%}
{%- endmacro -%}
{%- set system_first = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if system_first -%}
        {{- text_of(messages[0].content) + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif system_first -%}
    {{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and system_first -%}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + text_of(message.content) + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {%- set text = text_of(message.content) -%}
        {{- '<|im_start|>' + message.role + '\n' + text -}}
        {%- if message.role == 'assistant' and message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if text or not loop.first -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
                {%- if fn.arguments is string -%}
                    {{- fn.arguments -}}
                {%- elif fn.arguments is defined -%}
                    {{- fn.arguments | tojson -}}
                {%- else -%}
                    {{- '{}' -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

_IM_END = "<|im_end|>"
_ENDOFTEXT = "<|endoftext|>"


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render (including its own `raise_exception`)."""


# ----------------------------------------------------------------------------------------------------------------
# Chat template rendering
# ----------------------------------------------------------------------------------------------------------------


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's tojson: key order kept and non-ASCII kept (jinja's own tojson sorts keys and HTML-escapes).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` (it marks assistant spans for training masks) and
    render its body unchanged, so templates that use it still work."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile an HF-style chat template in a sandbox (no attribute escapes, no mutation of inputs).

    Raises `ChatTemplateError` (a ValueError) on a syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from None


def render_chat_template(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render a compiled chat template; every failure becomes a `ChatTemplateError` carrying its message."""
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:  # undefined misuse, sandbox violations, ...
        raise ChatTemplateError(f"chat template error: {e.message or type(e).__name__}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes tokens as strings or as serialized AddedTokens ({"content": ...}).
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _select_chat_template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # HF's multi-template form: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{path}: chat_template list has no 'default' template (names: {sorted(map(str, named))})")
    raise ValueError(f"{path}: chat_template must be a string or a list of named templates")


class Tokenizer:
    """A `tokenizers` tokenizer plus the chat template and special-token roles from an HF tokenizer dir."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        chat_template: str | None = None,
        eos_token: str | None = _IM_END,
        pad_token: str | None = _ENDOFTEXT,
        bos_token: str | None = None,
        extra_eos_token_ids: list[int] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self._extra_eos = list(extra_eos_token_ids or [])
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, and `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`
        when present. Without a config, eos is `<|im_end|>` and pad `<|endoftext|>` when those tokens exist."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
            raise ValueError(f"cannot parse {tok_file}: {e}") from None

        vocab_has = {t: backend.token_to_id(t) is not None for t in (_IM_END, _ENDOFTEXT)}
        eos = _IM_END if vocab_has[_IM_END] else (_ENDOFTEXT if vocab_has[_ENDOFTEXT] else None)
        pad = _ENDOFTEXT if vocab_has[_ENDOFTEXT] else None
        bos = None
        template = None
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = _read_json(cfg_file)
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_file}: expected a JSON object")
            template = _select_chat_template(cfg.get("chat_template"), cfg_file)
            if "eos_token" in cfg:
                eos = _token_content(cfg["eos_token"])
            if "pad_token" in cfg:
                pad = _token_content(cfg["pad_token"])
            bos = _token_content(cfg.get("bos_token"))
        # Recent transformers save the template in its own file, which then wins over the config entry.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        extra_eos: list[int] = []
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = _read_json(gen_file)
            value = gen.get("eos_token_id") if isinstance(gen, dict) else None
            ids = value if isinstance(value, list) else [value]
            extra_eos = [i for i in ids if isinstance(i, int)]
        return cls(backend, template, eos_token=eos, pad_token=pad, bos_token=bos, extra_eos_token_ids=extra_eos)

    # -- vocabulary -----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may have extra padding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that should stop generation: the eos token, `<|im_end|>`, `<|endoftext|>` (a safety stop) and
        the ids of `generation_config.json`'s eos_token_id; no duplicates, in that order."""
        ids = [self.eos_token_id, self.token_to_id(_IM_END), self.token_to_id(_ENDOFTEXT), *self._extra_eos]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of the added tokens flagged `special` (the ones `skip_special_tokens` drops)."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # -- text <-> ids ---------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special/added tokens written in the text (`<|im_start|>`...) map to their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; incomplete UTF-8 byte sequences come out as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_vars: Any,
    ) -> str | list[int]:
        """Render OpenAI-style `messages` (and `tools`) with the chat template; ids instead of text if `tokenize`.

        Extra keyword arguments become template variables (e.g. `enable_thinking=False` for templates that read
        it). Any template failure raises `ChatTemplateError`, a ValueError with the template's message."""
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            **template_vars,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        text = render_chat_template(self._compiled, variables)
        return self.encode(text) if tokenize else text


# ----------------------------------------------------------------------------------------------------------------
# Incremental detokenization
# ----------------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a UTF-8 character.

    Keeps two offsets into the ids: text up to `read` has been emitted; decoding starts at `prefix` (the token
    before the emitted text's end) so that decoders which treat the first token specially agree with a full decode.
    The concatenation of all `push` results and `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # end of the emitted ids
        self._prefix_text = ""  # decode(ids[_prefix:_read]), cached

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ('' while a multi-byte character is unfinished)."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self._prefix :])
        # U+FFFD at the end means the last bytes are an incomplete character: wait for more tokens.
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        delta = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return delta

    def flush(self) -> str:
        """Return the held-back tail even if it is an incomplete character (as U+FFFD)."""
        text = self._decode(self.ids[self._prefix :])
        delta = text[len(self._prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self._prefix_text = ""
        return delta


# ----------------------------------------------------------------------------------------------------------------
# Tool-call parsing (Qwen / Hermes format: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>)
# ----------------------------------------------------------------------------------------------------------------

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
