"""Runtime tokenizer: `tokenizer.json` through `tokenizers`, chat templates through sandboxed jinja2, and
incremental detokenization. Tool-call parsing lives in `qwen3next.tool_calls`.

Only `tokenizers`, `jinja2` and the standard library are imported here.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Qwen ChatML: each turn `<|im_start|>{role}\n{content}<|im_end|>\n`; a system turn only when the first message is
# one; tools listed in that system turn; consecutive tool results merged into one user turn of <tool_response>
# blocks. Written for qwen3next; its output is the Qwen3 Instruct format. Raw string: the `\n` escapes are Jinja
# string-literal escapes.
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


def generation_eos_ids(model_dir: str | Path) -> list[int]:
    """The ids of `generation_config.json`'s `eos_token_id` (an id or a list) in `model_dir`; [] without the file."""
    gen_file = Path(model_dir) / "generation_config.json"
    if not gen_file.is_file():
        return []
    gen = _read_json(gen_file)
    value = gen.get("eos_token_id") if isinstance(gen, dict) else None
    return [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]


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

        return cls(backend, template, eos_token=eos, pad_token=pad, bos_token=bos,
                   extra_eos_token_ids=generation_eos_ids(path))

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
