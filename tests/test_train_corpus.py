"""Corpus extraction (R XDR reader, unwrapping, SWORD/OSIS) and synthetic chat data. No network, no apt."""

from __future__ import annotations

import ast
import gzip
import json
import operator
import re
import struct
import zlib

import pytest

from qwen3next.train.corpus import (
    BibleBook,
    build_corpus,
    clean_austen,
    join_documents,
    osis_books,
    read_lazyload_db,
    read_r_serialized,
    read_r_string_vector,
    read_ztext_entries,
    split_documents,
    strip_osis,
    unwrap_paragraphs,
)
from qwen3next.train.synthetic import (
    TOOLS,
    fake_weather,
    generate_chat_examples,
    generate_conversations,
    render_chatml,
    write_synthetic,
)

# ----------------------------------------------------------------------------------------------------------------
# R serialization, written here straight from the format description (R Internals, "Serialization Formats"):
# "X\n", then big-endian ints: version, writer R version, min reader version, [v3: encoding length + name];
# each item starts with a flags int: low byte = SEXP type, bit 9 = has attributes, bit 10 = has tag,
# bits 12.. = "levels" (for CHARSXP the encoding: 8 = UTF-8, 4 = latin-1, 64 = ASCII).

STRSXP, CHARSXP, VECSXP, INTSXP, LGLSXP, LISTSXP, SYMSXP, NILVALUE, REFSXP = 16, 9, 19, 13, 10, 2, 1, 254, 255
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _header(version: int = 3) -> bytes:
    out = b"X\n" + _i(version, 0x040201, 0x030500)
    return out + (_i(5) + b"UTF-8" if version == 3 else b"")


def _charsxp(s: str | None, encoding: str = "utf-8") -> bytes:
    if s is None:
        return _i(CHARSXP, -1)
    level = {"utf-8": 8, "latin-1": 4, "ascii": 64}[encoding]
    raw = s.encode(encoding)
    return _i(CHARSXP | (level << 12), len(raw)) + raw


def _strsxp(strings: list[str | None], flags: int = 0) -> bytes:
    return _i(STRSXP | flags, len(strings)) + b"".join(_charsxp(s) for s in strings)


def _names_attr(names: list[str], first_use: bool) -> bytes:
    # Pairlist cell with tag `names` (a symbol, or a back-reference to the first symbol seen) and NULL tail.
    tag = _i(SYMSXP) + _charsxp("names", "ascii") if first_use else _i(REFSXP | (1 << 8))
    return _i(LISTSXP | HAS_TAG) + tag + _strsxp(names) + _i(NILVALUE)


def test_xdr_string_vector_versions_and_encodings():
    strings = ["EMMA", "", "café – “quoted”", None]
    for version in (2, 3):
        assert read_r_string_vector(_header(version) + _strsxp(strings)) == strings
    latin = _header() + _i(STRSXP, 2) + _charsxp("naïve", "latin-1") + _charsxp("plain", "ascii")
    assert read_r_string_vector(latin) == ["naïve", "plain"]


def test_xdr_rejects_other_formats_and_types():
    with pytest.raises(ValueError, match="XDR"):
        read_r_string_vector(b"A\n" + _header()[2:] + _strsxp(["x"]))
    with pytest.raises(ValueError, match="character vector"):
        read_r_string_vector(_header() + _i(INTSXP, 2, 1, 2))
    with pytest.raises(ValueError, match="truncated"):
        read_r_string_vector((_header() + _strsxp(["hello"]))[:-2])


def test_xdr_named_list_with_symbol_reference():
    inner = _i(VECSXP | HAS_ATTR, 1) + _i(INTSXP, 2, 7, -(2**31)) + _names_attr(["a"], first_use=True)
    outer = _i(VECSXP | HAS_ATTR, 2) + inner + _i(LGLSXP, 1, 1) + _names_attr(["vars", "flag"], first_use=False)
    obj = read_r_serialized(_header() + outer)
    assert obj.attributes["names"].value == ["vars", "flag"]
    assert obj.value[0].attributes["names"].value == ["a"]
    assert obj.value[0].value[0].value == [7, None]  # NA_integer_ -> None
    assert obj.value[1].value == [True]


def test_lazyload_db(tmp_path):
    novels = {"emma": ["EMMA", "", "CHAPTER I"], "persuasion": ["Persuasion", "by", "Jane Austen"]}
    rdb, positions = b"", []
    for strings in novels.values():
        payload = _header() + _strsxp(strings)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        positions.append((len(rdb), len(record)))
        rdb += record
    variables = _i(VECSXP | HAS_ATTR, len(novels))
    variables += b"".join(_i(INTSXP, 2, off, size) for off, size in positions)
    variables += _names_attr(list(novels), first_use=True)
    index = _i(VECSXP | HAS_ATTR, 3) + variables + _i(VECSXP, 0) + _i(LGLSXP, 1, 1)
    index += _names_attr(["variables", "references", "compressed"], first_use=False)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_header() + index))
    db = read_lazyload_db(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    assert {name: obj.value for name, obj in db.items()} == novels


# ----------------------------------------------------------------------------------------------------------------
# Austen text cleaning


def test_unwrap_paragraphs():
    lines = [
        "CHAPTER I",
        "",
        "",
        "It is a truth universally acknowledged, that a single man in possession",
        "of a good fortune,  must be in want of a wife.",
        "",
        "    My first doth affliction denote,",
        "      Which my second is destin'd to feel",
        "    and this line continues it.",
        "",
        '     "I am sure that Mrs.',
        "     Jennings will come, though",
        '     I cannot say when."',
    ]
    assert unwrap_paragraphs(lines) == [
        "CHAPTER I",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
        " of a wife.",
        "My first doth affliction denote,\nWhich my second is destin'd to feel and this line continues it.",
        '"I am sure that Mrs. Jennings will come, though I cannot say when."',
    ]


def test_clean_austen_drops_italics_and_editorial_notes():
    lines = ["Persuasion", "", "She was _very_ glad, and", "_so_ was he.", "", "[End of volume one of this edition.]"]
    lines += ["", "[To Mrs. Weston.]", "", "THE END", "", "A NOTE ON THE TEXT", "", "Modern editorial remark."]
    assert clean_austen(lines) == "Persuasion\n\nShe was very glad, and so was he.\n\n[To Mrs. Weston.]\n\nTHE END\n"


def test_documents_round_trip():
    docs = ["First doc.\n\nSecond paragraph.", "Second doc\n"]
    text = join_documents(docs)
    assert text == "First doc.\n\nSecond paragraph.\n<|endoftext|>\nSecond doc\n<|endoftext|>\n"
    assert split_documents(text) == ["First doc.\n\nSecond paragraph.\n", "Second doc\n"]
    with pytest.raises(ValueError, match="endoftext"):
        join_documents(["bad <|endoftext|> doc"])
    with pytest.raises(ValueError, match="terminator"):
        split_documents("no terminator")


# ----------------------------------------------------------------------------------------------------------------
# SWORD zText + OSIS


def test_strip_osis():
    markup = (
        '<w lemma="strong:H7225">In</w> the <w lemma="strong:H0430">beginning</w>, God<note placement="foot">'
        '<reference type="annotateRef">1:1 </reference>The Hebrew word is <hi>Elohim</hi>.</note>created'
        ' <q who="x">heaven &amp; earth</q>.<note type="crossReference"><reference>Ps 1:1</reference></note>'
    )
    assert strip_osis(markup) == "In the beginning, God created heaven & earth."


def _write_ztext(path, blocks: list[list[str]]) -> list[str]:
    """A zText testament from blocks of verse texts; returns the slot texts in index order."""
    bzs, bzz, bzv, slots = b"", b"", b"", [""]
    bzv += struct.pack("<IIH", 0, 0, 0)  # slot 0: module header, empty here
    for b, texts in enumerate(blocks):
        raw = "".join(texts).encode()
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
        offset = 0
        for text in texts:
            size = len(text.encode())
            bzv += struct.pack("<IIH", b if size else 0, offset if size else 0, size)
            slots.append(text)
            offset += size
    for ext, data in (("bzs", bzs), ("bzz", bzz), ("bzv", bzv)):
        (path / f"nt.{ext}").write_bytes(data)
    return slots


def test_read_ztext_entries(tmp_path):
    blocks = [["<milestone/>", "Verse one.", "Vers\u00e9 two — ok."], ["", "Another block’s verse.", "x"]]
    expected = _write_ztext(tmp_path, blocks)
    assert read_ztext_entries(tmp_path, "nt") == expected
    assert expected[4] == "" and expected[5] == "Another block’s verse."
    with pytest.raises(ValueError, match="testament"):
        read_ztext_entries(tmp_path, "apocrypha")
    (tmp_path / "nt.bzv").write_bytes((tmp_path / "nt.bzv").read_bytes()[:-3])
    with pytest.raises(ValueError, match="multiples"):
        read_ztext_entries(tmp_path, "nt")


def test_osis_books():
    entries = [
        "",
        '<div sID="f1" type="front"/><title>Preface</title><div sID="p0" type="x-p"/>Editorial text.',
        '<div eID="p0" type="x-p"/><div eID="f1" type="front"/>'
        '<div osisID="Ruth" sID="b1" type="book"/><milestone n="Ruth" type="x-usfm-toc2"/>'
        '<milestone n="The Book of Ruth" type="x-usfm-toc1"/><title type="main">RUTH</title>'
        '<chapter n="1" osisID="Ruth.1" sID="Ruth.1"/><div sID="p1" type="x-p"/>',
        "<w>In</w> the days<note>a footnote</note> when judges judged,",
        "there was a famine.",
        '<div eID="p1" type="x-p"/><lg sID="g1"/><l sID="l1"/>Where you go, I will go;<l eID="l1"/>',
        '<l sID="l2"/>your people will be my people.<l eID="l2"/><lg eID="g1"/><chapter eID="Ruth.1"/>',
        '<chapter n="2" osisID="Ruth.2" sID="Ruth.2"/><title canonical="true" type="psalm">A song.</title>'
        "Boaz came.",
        '<div eID="b1" osisID="Ruth" type="book"/>Stray text outside any book.',
        '<div osisID="Jude" sID="b2" type="book"/><milestone n="Jude" type="x-usfm-toc2"/>'
        '<chapter n="1" osisID="Jude.1" sID="Jude.1"/><div sID="i1" type="introduction"/>Intro.'
        '<div eID="i1" type="introduction"/>Jude wrote.<div eID="b2" osisID="Jude" type="book"/>',
    ]
    ruth, jude = osis_books(entries)
    assert (ruth.osis_id, jude.osis_id) == ("Ruth", "Jude")
    assert ruth.text() == (
        "The Book of Ruth\n\nRuth 1\n\nIn the days when judges judged, there was a famine.\n\n"
        "Where you go, I will go;\nyour people will be my people.\n\nRuth 2\n\nA song.\n\nBoaz came.\n"
    )
    assert jude.text() == "Jude\n\nJude wrote.\n"  # the single chapter heading is dropped


def test_bible_book_chapter_label_replaces_heading():
    entries = [
        '<div osisID="Ps" sID="b" type="book"/><milestone n="Psalms" type="x-usfm-toc2"/>'
        '<chapter n="23" osisID="Ps.23" sID="Ps.23"/><milestone n="Psalm 23" type="x-chapterLabel"/>'
        "<l/>Yahweh is my shepherd:<l/>I shall lack nothing.",
        '<chapter n="24" osisID="Ps.24" sID="Ps.24"/>The earth is Yahweh’s.',
    ]
    (book,) = osis_books(entries)
    assert isinstance(book, BibleBook)
    assert book.text() == (
        "Psalms\n\nPsalm 23\n\nYahweh is my shepherd:\nI shall lack nothing.\n\nPsalms 24\n\nThe earth is Yahweh’s.\n"
    )


def test_build_corpus_validates_sources(tmp_path):
    with pytest.raises(ValueError, match="sources"):
        build_corpus(tmp_path, sources=("shakespeare",))


# ----------------------------------------------------------------------------------------------------------------
# Synthetic chat data

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _safe_eval(expression: str) -> float:
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return ev(ast.parse(expression, mode="eval"))


def test_conversations_are_deterministic():
    assert generate_conversations(50, seed=7) == generate_conversations(50, seed=7)
    assert generate_conversations(50, seed=7) != generate_conversations(50, seed=8)


def test_tool_calls_are_valid_and_results_correct():
    examples = generate_chat_examples(600, seed=1)
    declared = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    counts = {"calculator": 0, "get_weather": 0, "multi": 0}
    for example in examples:
        msgs = example.messages
        for i, message in enumerate(msgs):
            if not message.get("tool_calls"):
                continue
            assert example.tools is not None and message["content"] == ""
            calls = message["tool_calls"]
            counts["multi"] += len(calls) > 1
            responses = msgs[i + 1 : i + 1 + len(calls)]
            assert [r["role"] for r in responses] == ["tool"] * len(calls)
            assert [r["tool_call_id"] for r in responses] == [c["id"] for c in calls]
            final = msgs[i + 1 + len(calls)]
            assert final["role"] == "assistant" and not final.get("tool_calls")
            for call, response in zip(calls, responses, strict=True):
                name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
                assert name in declared and set(args) == set(declared[name]["required"])
                counts[name] += 1
                if name == "calculator":
                    value = _safe_eval(args["expression"])
                    assert value == int(value) and response["content"] == str(int(value))
                    assert re.search(rf"(?<![\d-]){int(value)}\.$", final["content"])
                else:
                    report = json.loads(response["content"])
                    assert report["city"] == args["city"] and report["city"] in final["content"]
                    assert f"{report['temperature_c']}°C" in final["content"]
                    assert f"{report['humidity']}%" in final["content"]
    assert min(counts.values()) > 0


def test_plain_answers_are_correct():
    checked = 0
    for conversation in generate_conversations(400, seed=2):
        for user, reply in zip(conversation, conversation[1:], strict=False):
            if user["role"] != "user" or reply["role"] != "assistant":
                continue
            q, a = user["content"], reply["content"]
            if m := re.fullmatch(r"Reverse the word '(\w+)'\.", q):
                assert f"'{m[1][::-1]}'" in a
            elif m := re.fullmatch(r"How many letters are in the word '(\w+)'\?", q):
                assert f" {len(m[1])} letters" in a
            elif m := re.fullmatch(r"What's (\d+) ([-+*/]) (\d+)\?", q):
                assert a.endswith(f" {int(_safe_eval(m[1] + m[2] + m[3]))}.")
            elif m := re.fullmatch(r"Count from (\d+) to (\d+)\.", q):
                assert a == ", ".join(str(k) for k in range(int(m[1]), int(m[2]) + 1)) + "."
            elif m := re.fullmatch(r"What day comes after (\w+)\?", q):
                days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
                assert a.endswith(days[(days.index(m[1]) + 1) % 7] + ".")
            elif q == "What is the capital of France?":
                assert "Paris" in a
            else:
                continue
            checked += 1
    assert checked > 50


def test_render_chatml_format():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "A"},
        {"role": "tool", "content": "B"},
        {"role": "assistant", "content": "Done."},
    ]
    tool = {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {}}}
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tool)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo and Rome?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nA\n</tool_response>\n<tool_response>\nB\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nDone.<|im_end|>\n"
    )
    assert render_chatml(messages, [tool]) == expected
    plain = render_chatml(messages[:2], None, add_generation_prompt=True)
    assert plain == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Oslo and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    one_call = messages[2]["tool_calls"][:1]
    with_text = render_chatml([{"role": "assistant", "content": "Let me check.", "tool_calls": one_call}])
    assert with_text.startswith("<|im_start|>assistant\nLet me check.\n<tool_call>\n")
    with pytest.raises(ValueError, match="role"):
        render_chatml([{"role": "developer", "content": "x"}])


def test_rendered_conversations_are_balanced():
    for example in generate_chat_examples(300, seed=3):
        text = render_chatml(example.messages, example.tools)
        turns = re.findall(r"<\|im_start\|>|<\|im_end\|>", text)
        assert turns == ["<|im_start|>", "<|im_end|>"] * (len(turns) // 2)
        assert text.count("<tool_call>") == text.count("</tool_call>")
        assert ("# Tools" in text) == (example.tools is not None)
        for body in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, flags=re.S):
            if body != '{"name": <function-name>, "arguments": <args-json-object>}':
                call = json.loads(body)
                assert call["name"] in {t["function"]["name"] for t in TOOLS}


def test_fake_weather_is_deterministic():
    assert fake_weather("Paris", 3) == fake_weather("Paris", 3)
    reports = [fake_weather("Paris", v) for v in range(50)]
    assert len({json.dumps(r) for r in reports}) > 10
    assert all(r["condition"] != "snowy" or r["temperature_c"] <= 2 for r in reports)


def test_write_synthetic(tmp_path):
    sizes = write_synthetic(tmp_path, n_train=40, n_heldout=10, seed=0, n_tool_eval=30)
    train = split_documents((tmp_path / "chat_train.txt").read_text(encoding="utf-8"))
    heldout = split_documents((tmp_path / "chat_heldout.txt").read_text(encoding="utf-8"))
    assert (len(train), len(heldout)) == (40, 10)
    assert all(doc.endswith("<|im_end|>\n") for doc in train + heldout)
    assert sizes["chat_train.txt"] == (tmp_path / "chat_train.txt").stat().st_size
    items = [json.loads(line) for line in (tmp_path / "tool_eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(items) == 30
    assert len({json.dumps(item["messages"]) for item in items}) == 30
    for item in items:
        assert item["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert item["messages"][-1]["role"] == "user" and item["messages"][-1]["content"] in item["prompt"]
        for call in item["expected_tool_calls"]:
            assert call["name"] in {"calculator", "get_weather"}
            if call["name"] == "calculator":
                assert _safe_eval(call["arguments"]["expression"]) == int(_safe_eval(call["arguments"]["expression"]))
        assert (item["expected_answer"] is None) == bool(item["expected_tool_calls"])
    again = tmp_path / "again"
    write_synthetic(again, n_train=40, n_heldout=10, seed=0, n_tool_eval=30)
    for name in ("chat_train.txt", "chat_heldout.txt", "tool_eval.jsonl"):
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()
