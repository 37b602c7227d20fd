import json
import unicodedata

import pytest

from qwen3next.tokenizer import Tokenizer
from qwen3next.train.tokenizer_build import build_from_qwen_ranks, recover_merges, train_bpe
from tokenizer_fixtures import QWEN_SPLIT, K, built_dir, qwen_ranks

# Qwen3's added tokens (ids 151643..151668 in the full vocab), in id order, with the `special` flag.
# fmt: off
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
# fmt: on

PARAGRAPHS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be... they'll say \"I'm sure\" it's so!",
    "def fibonacci(n: int) -> list[int]:\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n"
    "        out.append(a)\n        a, b = b, a + b\n    return out\n\n\nif __name__ == '__main__':\n"
    "\tprint(fibonacci(10))  # [0, 1, 1, 2, ...]\r\n",
    "自然语言处理是人工智能的一个重要分支。我们今天去北京大学参观，天气很好！日本語のテキストも少し。한국어 문장.",
    "Emoji time 🙂👍🏽🇫🇷 and 👨‍👩‍👧‍👦 family; math ∑ x² ≤ ∞; accents: naïve café Ünïcödé façade.",
    "Numbers 1234567890, 3.14159, -42, 1e-9, 2026-11-28T15:35:00Z and phone +1 (555) 010-9999.",
    "Whitespace   runs\t\t\ttabs\n\n\n\nnewlines    \n  trailing   \n\n   leading and    a lone space ",
]


def tiktoken_encoder(num_ranks: int | None):
    """The oracle: tiktoken's rank-based BPE on the first `num_ranks` Qwen ranks with Qwen's split regex."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {t: r for t, r in qwen_ranks().items() if num_ranks is None or r < num_ranks}
    return tiktoken.Encoding("qwen-test", pat_str=QWEN_SPLIT, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="session")
def k_dir(tmp_path_factory):
    return built_dir(tmp_path_factory, K)


@pytest.fixture(scope="session")
def full_dir(tmp_path_factory):
    return built_dir(tmp_path_factory, None)


def check_added_tokens(directory, base, data=None):
    data = data or json.loads((directory / "tokenizer.json").read_text())
    added = {t["id"]: (t["content"], t["special"]) for t in data["added_tokens"]}
    assert added == {base + i: entry for i, entry in enumerate(QWEN3_ADDED)}
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    decoder = {int(i): (t["content"], t["special"]) for i, t in cfg["added_tokens_decoder"].items()}
    assert decoder == added
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert isinstance(cfg["model_max_length"], int) and "<|im_start|>" in cfg["chat_template"]
    smap = json.loads((directory / "special_tokens_map.json").read_text())
    assert smap["eos_token"] == "<|im_end|>" and smap["pad_token"] == "<|endoftext|>"

    tok = Tokenizer.from_dir(directory)
    assert tok.vocab_size == base + 26
    assert tok.special_token_ids == {base + i for i, (_, special) in enumerate(QWEN3_ADDED) if special}
    assert tok.eos_token_id == base + 2 and tok.pad_token_id == base and tok.bos_token_id is None
    for i, (content, _) in enumerate(QWEN3_ADDED):
        assert tok.token_to_id(content) == base + i
        assert tok.encode(f"a{content}b")[1] == base + i  # recognised inside text
    return tok


def test_truncated_build_matches_tiktoken_and_qwen_ids(k_dir):
    tok = check_added_tokens(k_dir, K)
    enc = tiktoken_encoder(K)
    for text in PARAGRAPHS:
        text = unicodedata.normalize("NFC", text)
        ids = tok.encode(text)
        assert ids == enc.encode(text)
        assert max(ids) < K
        assert tok.decode(ids) == text
    # Every base id is the Qwen token of the same rank.
    ranks = qwen_ranks()
    checked = 0
    for token, rank in ranks.items():
        if rank >= K:
            continue
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:  # a partial character: decodes to U+FFFD on its own
            continue
        assert tok.decode([rank]) == text
        checked += 1
    assert checked > K // 2


def test_full_build_known_vectors_and_tiktoken(full_dir):
    data = json.loads((full_dir / "tokenizer.json").read_text())
    assert len(data["model"]["merges"]) == 151_387
    tok = check_added_tokens(full_dir, 151643, data)
    # Known ids of the real Qwen3 tokenizer for these strings.
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.encode("你好，世界") == [108386, 3837, 99489]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n") == [151644, 872, 198, 13048, 151645, 198]
    assert tok.eos_token_ids == [151645, 151643]
    enc = tiktoken_encoder(None)
    for text in PARAGRAPHS:
        text = unicodedata.normalize("NFC", text)
        assert tok.encode(text) == enc.encode(text)


def test_recover_merges_replays_bpe_not_an_arbitrary_split():
    # "abc" (rank 5) must come from ("ab", "c"): "ab" (rank 3) merges before "bc" (rank 4).
    tokens = [b"a", b"b", b"c", b"ab", b"bc", b"abc"]
    assert recover_merges(tokens) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
    tokens = [b"a", b"b", b"c", b"bc", b"ab", b"abc"]
    assert recover_merges(tokens) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]


def test_build_rejects_bad_arguments(tmp_path):
    from tokenizer_fixtures import rank_file

    with pytest.raises(ValueError, match="num_ranks"):
        build_from_qwen_ranks(100, tmp_path / "x", rank_file())
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        build_from_qwen_ranks(300, tmp_path / "x", str(tmp_path / "nope.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("!!notbase64 zero\n")
    with pytest.raises(ValueError, match="bad.tiktoken:1"):
        build_from_qwen_ranks(None, tmp_path / "x", str(bad))


def test_train_bpe_appends_specials_and_template(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("\n".join(PARAGRAPHS) + "\n") * 20, encoding="utf-8")
    out = train_bpe([str(corpus)], 300, tmp_path / "tok")
    data = json.loads((out / "tokenizer.json").read_text())
    learned = len(data["model"]["vocab"])
    assert 256 < learned <= 300
    tok = check_added_tokens(out, learned)
    for text in PARAGRAPHS:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == learned + 1 and ids.count(learned + 1) == 2 and ids.count(learned + 2) == 1
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe([str(corpus)], 100, tmp_path / "t2")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe([str(tmp_path / "missing.txt")], 300, tmp_path / "t3")


def test_transformers_loads_the_build_identically(k_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(k_dir))
    tok = Tokenizer.from_dir(k_dir)
    text = "".join(PARAGRAPHS) + "<|im_start|>user\nHi<|im_end|>\n<tool_call>x</tool_call>"
    assert hf.encode(text) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
        ]},
        {"role": "tool", "content": "20C"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(msgs, tools=tools)
    )
