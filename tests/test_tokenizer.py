import json
import shutil

import pytest

from qwen3next.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer
from qwen3next.tool_calls import ContentEvent, StreamingToolCallParser, ToolCallEvent, parse_tool_calls
from tokenizer_fixtures import K, built_dir

IM_START, IM_END, ENDOFTEXT = K + 1, K + 2, K  # ids in the truncated build


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return built_dir(tmp_path_factory, K)


@pytest.fixture(scope="session")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def copy_with(tmp_path, tok_dir, files):
    """A tokenizer dir holding the built tokenizer.json plus `files` ({name: text})."""
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


def test_from_dir_errors_name_the_file(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    copy_with(tmp_path, tok_dir, {"tokenizer_config.json": "{"})
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    no_default = {"chat_template": [{"name": "tool_use", "template": "x"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(no_default))
    with pytest.raises(ValueError, match="default"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_defaults_without_config(tmp_path, tok_dir):
    t = Tokenizer.from_dir(copy_with(tmp_path, tok_dir, {}))
    assert t.chat_template == DEFAULT_CHAT_TEMPLATE
    assert t.eos_token_id == IM_END and t.pad_token_id == ENDOFTEXT and t.bos_token_id is None
    assert t.eos_token_ids == [IM_END, ENDOFTEXT]


def test_from_dir_reads_config_template_list_and_generation_config(tmp_path, tok_dir):
    cfg = {
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "D:{{ messages[0].content }}"},
        ],
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "pad_token": "<|fim_pad|>",
        "bos_token": None,
    }
    gen = {"eos_token_id": [IM_END, ENDOFTEXT, 7]}
    files = {"tokenizer_config.json": json.dumps(cfg), "generation_config.json": json.dumps(gen)}
    d = copy_with(tmp_path, tok_dir, files)
    t = Tokenizer.from_dir(d)
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "D:hi"
    assert t.eos_token_id == ENDOFTEXT and t.pad_token_id == t.token_to_id("<|fim_pad|>")
    assert t.eos_token_ids == [ENDOFTEXT, IM_END, 7]
    # A separate chat_template.jinja (newer transformers) wins over the config entry.
    (d / "chat_template.jinja").write_text("J:{{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "J:1"


def test_encode_decode_and_special_tokens(tok):
    text = "<|im_start|>user\nCall <tool_call>x</tool_call> ok<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == IM_START and IM_END in ids and tok.token_to_id("<tool_call>") in ids
    assert tok.decode(ids) == text
    # <tool_call> is an added token but not "special": skip_special_tokens keeps it.
    assert tok.decode(ids, skip_special_tokens=True) == "user\nCall <tool_call>x</tool_call> ok\n"
    assert IM_START in tok.special_token_ids and tok.token_to_id("<tool_call>") not in tok.special_token_ids
    assert tok.token_to_id("definitely-not-a-token") is None
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=True)  # Qwen adds no BOS


# ------------------------------------------------------------------------------------------------------------------
# Chat template (expected strings written by hand in the Qwen3 Instruct ChatML format)
# ------------------------------------------------------------------------------------------------------------------

TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo du jour",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_LINE = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Météo du jour", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
CLOCK_LINE = '{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}'


def test_template_plain_chat(tok):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    body = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    assert tok.apply_chat_template(msgs) == body + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == body
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(body + "<|im_start|>assistant\n") and ids[0] == IM_START and ids.count(IM_END) == 3


def test_template_system_and_content_parts(tok):
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]},
    ]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nLine one.\nLine two.<|im_end|>\n"
    )


def test_template_tools_with_and_without_system(tok):
    user = {"role": "user", "content": "Weather in Paris?"}
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, user], tools=[WEATHER, CLOCK])
    assert with_system == (
        "<|im_start|>system\nBe terse.\n\n" + TOOLS_INTRO + WEATHER_LINE + "\n" + CLOCK_LINE + TOOLS_OUTRO
        + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip
    without_system = tok.apply_chat_template([user], tools=[WEATHER], add_generation_prompt=False)
    assert without_system == (
        "<|im_start|>system\n" + TOOLS_INTRO + WEATHER_LINE + TOOLS_OUTRO
        + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    )  # fmt: skip


def test_template_assistant_tool_calls_and_merged_tool_results(tok):
    dict_call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    str_call = {"type": "function", "function": {"name": "now", "arguments": '{"tz": "Europe/Paris"}'}}
    msgs = [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "", "tool_calls": [dict_call, str_call]},
        {"role": "tool", "content": "21°C"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Let me check again.", "tool_calls": [dict_call]},
        {"role": "tool", "content": "22°C"},
    ]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>user\nWeather and time?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {"tz": "Europe/Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21°C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\nLet me check again.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n22°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_round_trips_through_tool_call_parser(tok):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "n": [1, 2]}}}
    text = tok.apply_chat_template(
        [{"role": "assistant", "content": "Sure.", "tool_calls": [call, call]}], add_generation_prompt=False
    )
    inner = text.removeprefix("<|im_start|>assistant\n").removesuffix("<|im_end|>\n")
    content, calls = parse_tool_calls(inner)
    assert content == "Sure."
    assert calls == [{"name": "get_weather", "arguments": {"city": "Zürich", "n": [1, 2]}}] * 2


def test_custom_template_vars_and_helpers(tmp_path, tok_dir):
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ greeting }}|{{ strftime_now('%Y') | length }}|"
        "{{ {'b': 1, 'a': 'é'} | tojson }}|{{ [1, 2] | tojson(indent=2) }}|"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}|"
        "{% generation %}gen{% endgeneration %}"
    )
    d = copy_with(tmp_path, tok_dir, {"tokenizer_config.json": json.dumps({"chat_template": template})})
    t = Tokenizer.from_dir(d)
    msgs = [{"role": "skip", "content": "no"}, {"role": "user", "content": "yes"}]
    expected = '|<|im_end|>|hey|4|{"b": 1, "a": "é"}|[\n  1,\n  2\n]|yes|gen'
    assert t.apply_chat_template(msgs, greeting="hey") == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('System role not supported') }}", "System role not supported"),
        ("{{ messages[0].nothing.deeper }}", "nothing"),
        ("{% if %}", "syntax"),
        ("{{ 1 + 'a' }}", "TypeError"),
    ],
)
def test_template_errors_become_value_errors(tmp_path, tok_dir, template, message):
    d = copy_with(tmp_path, tok_dir, {"tokenizer_config.json": json.dumps({"chat_template": template})})
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
        "{% set _ = messages.append({'role': 'x'}) %}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_sandbox_blocks_escapes_and_mutation(tmp_path, tok_dir, template):
    d = copy_with(tmp_path, tok_dir, {"tokenizer_config.json": json.dumps({"chat_template": template})})
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="unsafe"):
        Tokenizer.from_dir(d).apply_chat_template(msgs)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_sandbox_hides_dunder_attributes(tmp_path, tok_dir):
    d = copy_with(tmp_path, tok_dir, {"tokenizer_config.json": json.dumps({"chat_template": "[{{ ''.__class__ }}]"})})
    assert Tokenizer.from_dir(d).apply_chat_template([]) == "[]"


# ------------------------------------------------------------------------------------------------------------------
# Incremental detokenizer
# ------------------------------------------------------------------------------------------------------------------

MULTIBYTE = "你好，世界！自然语言处理 🙂👍🏽🇫🇷 👨‍👩‍👧 naïve café Ünïcödé — 日本語\n"


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_detokenizer_never_splits_characters(tok, skip_special_tokens):
    ids = tok.encode("<|im_start|>assistant\n" + MULTIBYTE + "<|im_end|>")
    assert len(ids) > len(MULTIBYTE)  # the truncated vocab spells many characters byte by byte
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert sum(p == "" for p in pieces) > 0  # some bytes were held back
    assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_detokenizer_flushes_an_incomplete_tail_like_decode(tok):
    ids = tok.encode("ok 🙂")
    partial = ids[:-1]  # the emoji's last byte is missing
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(i) for i in partial)
    assert "\ufffd" not in text
    assert text + detok.flush() == tok.decode(partial)
    assert tok.decode(partial).endswith("\ufffd")


def test_detokenizer_decodes_a_small_window(tok):
    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=False):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    ids = tok.encode(MULTIBYTE * 20)
    detok = IncrementalDetokenizer(counting)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tok.decode(ids)
    assert counting.longest <= 12 < len(ids)


# ------------------------------------------------------------------------------------------------------------------
# Tool-call parsing
# ------------------------------------------------------------------------------------------------------------------

PARSER_CASES = [
    "Just text, no calls. a < b and <tool or <tool_call without end",
    'Sure!\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<tool_call>{"name":"a","arguments":{"x":1}}</tool_call><tool_call>  {"name": "b"}  </tool_call>',
    'Before\n<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>\nmiddle\n'  # malformed: brace missing
    '<tool_call>\n{"arguments": {}}\n</tool_call>\n'  # no name
    '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": [1, 2]}"}\n</tool_call>\n  after  ',
    '  \n<tool_call>\n{"name": "c", "arguments": {"s": "</tool"}}\n</tool_call>\n\n'
    '<tool_call>\n{"name": "d", "arguments": {}}',  # the last call never ends
]


def test_parse_tool_calls():
    content, calls = parse_tool_calls(PARSER_CASES[1])
    assert content == "Sure!" and calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    content, calls = parse_tool_calls(PARSER_CASES[2])
    assert content == "" and calls == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]
    content, calls = parse_tool_calls(PARSER_CASES[3])
    assert calls == [{"name": "b", "arguments": {"y": [1, 2]}}]
    assert content == (
        'Before\n<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>\nmiddle\n'
        '<tool_call>\n{"arguments": {}}\n</tool_call>\n\n  after'
    )
    content, calls = parse_tool_calls(PARSER_CASES[4])
    assert calls == [{"name": "c", "arguments": {"s": "</tool"}}]
    assert content == '<tool_call>\n{"name": "d", "arguments": {}}'
    assert parse_tool_calls(PARSER_CASES[0]) == (PARSER_CASES[0], [])
    assert parse_tool_calls('<tool_call>{"name": "x", "arguments": [1]}</tool_call>')[1] == []


def run_stream(deltas):
    parser = StreamingToolCallParser()
    events = [e for d in deltas for e in parser.feed(d)] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentEvent))
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [c.index for c in calls] == list(range(len(calls))) and parser.num_tool_calls == len(calls)
    return content, [{"name": c.name, "arguments": c.arguments} for c in calls]


@pytest.mark.parametrize("text", PARSER_CASES)
def test_streaming_parser_matches_batch_at_every_split(text):
    expected = parse_tool_calls(text)
    assert run_stream(list(text)) == expected
    for i in range(len(text) + 1):
        assert run_stream([text[:i], text[i:]]) == expected, i


def test_streaming_parser_holds_back_only_a_possible_tag():
    parser = StreamingToolCallParser()
    assert parser.feed("Hello wor") == [ContentEvent("Hello wor")]
    assert parser.feed("ld <tool") == [ContentEvent("ld")]  # " <tool" might start a call
    assert parser.feed("s> a < b") == [ContentEvent(" <tools> a < b")]
    assert parser.feed(' <tool_call>\n{"name": "f", "arguments": {"q": "x"}}\n') == []
    assert parser.feed("</tool_call>") == [ToolCallEvent(0, "f", {"q": "x"})]
    assert parser.finish() == []
    assert ToolCallEvent(0, "f", {"q": "é"}).arguments_json == '{"q": "é"}'


def test_streaming_parser_flushes_unterminated_call_as_content():
    parser = StreamingToolCallParser()
    assert parser.feed('<tool_call>\n{"name": "f", "argum') == []
    assert parser.finish() == [ContentEvent('<tool_call>\n{"name": "f", "argum')]
