"""Evaluation (qwen3next/eval): chunked loss vs one full forward, position buckets, passkey prompts and grading, the
`qwen3next eval` command line, tool-call scoring, and the rule that train/ never imports the engine."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3next import DEFAULT_MODEL
from qwen3next.checkpoint import load_model
from qwen3next.cli import main as cli_main
from qwen3next.eval.loss import PositionLoss, default_bucket_size, split_windows, token_nll, token_nll_full
from qwen3next.eval.passkey import NEEDLE, PasskeyPrompts, is_correct
from qwen3next.eval.ppl import windows_per_context
from qwen3next.model import qwen3_next as model_module
from qwen3next.tokenizer import Tokenizer
from tiny_models import make_model, write_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = ROOT / "qwen3next" / "bench" / "austen_passages.txt"  # 3.4 KB of Austen, shipped with the package
YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 512}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_model")
    make_model("base", vocab_size=261).save_pretrained(d)  # max_position_embeddings 512
    write_byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def demo_tok():
    return Tokenizer.from_dir(DEFAULT_MODEL)


def reference_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token t | tokens < t) for t = 1..T-1 from one plain forward (all logits at once)."""
    logp = model(ids[None])[0, :-1].float().log_softmax(-1)
    return -logp.gather(-1, ids[1:, None])[:, 0]


# ---- loss ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [7, 64, 129, 500])
def test_chunked_loss_equals_one_full_forward(chunk_size, monkeypatch):
    monkeypatch.setattr(model_module, "LOGPROB_ROWS", 50)  # LM-head pieces of 50 rows split the larger chunks
    model = make_model("base")
    ids = torch.randint(0, 97, (130,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_nll(model, ids)
    got = token_nll(model, ids, chunk_size)
    assert got.shape == (129,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(token_nll_full(model, ids), ref, atol=2e-5, rtol=1e-5)


def test_chunked_loss_with_yarn_beyond_the_original_context():
    model = make_model("yarn")  # YaRN x4 from 32 positions
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference_nll(model, ids)
    torch.testing.assert_close(token_nll(model, ids, 48), ref, atol=2e-5, rtol=1e-5)


def test_chunked_loss_on_the_demo_model(demo_tok):
    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    ids = torch.tensor(demo_tok.encode(PASSAGES.read_text(encoding="utf-8"))[:400])
    with torch.no_grad():
        ref = reference_nll(model, ids)
    got = token_nll(model, ids, 128)
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-5)
    assert 1.0 < got.mean().item() < 5.0  # a trained model on the text it was trained on (held-out loss ~3.5)


def test_loss_needs_two_tokens():
    with pytest.raises(ValueError, match="ids"):
        token_nll(make_model("base"), [5])


# ---- buckets and windows ---------------------------------------------------------------------------------------------
def test_position_buckets_by_hand():
    acc = PositionLoss(context=10, bucket_size=4)
    nll = torch.arange(1, 10, dtype=torch.float32)  # loss = the position it scores: 1..9
    acc.add(nll)
    acc.add(nll + 1)
    b = acc.buckets()
    assert [(x["start"], x["end"], x["tokens"]) for x in b] == [(0, 4, 6), (4, 8, 8), (8, 10, 4)]
    # bucket 0: positions 1,2,3 (+1 in window 2) -> (6 + 9) / 6; bucket 1: 4..7 -> (22 + 26) / 8; bucket 2: 8, 9
    assert [x["nll"] for x in b] == pytest.approx([15 / 6, 48 / 8, 36 / 4])
    assert b[1]["ppl"] == pytest.approx(math.exp(6.0))
    assert acc.windows == 2 and acc.mean_nll == pytest.approx((45 + 54) / 18)
    with pytest.raises(ValueError, match="nll"):
        acc.add(torch.zeros(10))


def test_huge_losses_have_infinite_perplexity():
    acc = PositionLoss(context=3, bucket_size=2)
    acc.add(torch.tensor([800.0, 1.0]))  # exp(800) overflows a float
    b = acc.buckets()
    assert b[0]["ppl"] == math.inf and b[1]["ppl"] == pytest.approx(math.e)
    assert acc.to_dict()["ppl"] == pytest.approx(math.exp(400.5))
    acc = PositionLoss(context=3, bucket_size=2)
    acc.add(torch.tensor([1500.0, 1500.0]))
    assert acc.to_dict()["ppl"] == math.inf
    assert math.isnan(PositionLoss(context=3, bucket_size=2).to_dict()["ppl"])  # nothing scored


def test_default_bucket_size_and_windows():
    assert [default_bucket_size(n) for n in (65536, 16384, 4096, 100, 4)] == [4096, 2048, 512, 12, 1]
    ids = list(range(25))
    assert split_windows(ids, 10) == [list(range(10)), list(range(10, 20))]
    assert split_windows(ids, 10, max_windows=1) == [list(range(10))]
    assert split_windows(ids, 30) == []
    # --max-tokens gives every context the same amount of text (at least one window); --max-windows caps it
    assert [windows_per_context(L, None, 32768) for L in (4096, 16384, 65536)] == [8, 2, 1]
    assert windows_per_context(4096, 3, 32768) == 3 and windows_per_context(4096, None, None) is None


# ---- passkey ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,ok", [
    (" 71432. Remember it.", True), ("the key: 71432", True), ("71432", True),
    ("714320", False), ("171432 is it", False), ("7 1 4 3 2", False), ("", False), ("71433", False),
])
def test_passkey_grading(answer, ok):
    assert is_correct(answer, "71432") is ok


@pytest.mark.parametrize("chat", [False, True])
def test_passkey_prompts_have_the_exact_length_and_the_needle_at_its_depth(demo_tok, chat):
    import random

    prompts = PasskeyPrompts(demo_tok, PASSAGES.read_text(encoding="utf-8"), chat=chat)
    needle = prompts.needle_ids("71432")
    rng = random.Random(0)
    where = []
    for length in (300, 2000):  # 2000 tokens repeat the 0.8K-token passages
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            p = prompts.build(length, depth, "71432", rng)
            assert len(p.ids) == length
            assert p.ids[p.needle_at:p.needle_at + len(needle)] == needle
            assert p.ids[:len(prompts.head)] == prompts.head and p.ids[-len(prompts.tail):] == prompts.tail
            hay = length - prompts.fixed_tokens("71432")
            before = demo_tok.decode(p.ids[len(prompts.head):p.needle_at])
            at_end = p.needle_at - len(prompts.head) == hay  # right before the question
            assert at_end or before == "" or before.rstrip().endswith((".", "!", "?", '"')) or before.endswith("\n")
            where.append((p.needle_at - len(prompts.head)) / hay)
        text = demo_tok.decode(p.ids)
        assert NEEDLE.format(key="71432") in text and text.endswith("The pass key is")
    for i in (0, 5):
        assert where[i] == 0.0 and where[i + 4] == 1.0
        assert where[i] <= where[i + 1] <= where[i + 2] <= where[i + 3] <= where[i + 4]
        assert abs(where[i + 2] - 0.5) < 0.2  # snapped to a sentence end near the middle
    if chat:
        assert demo_tok.decode(prompts.head).startswith("<|im_start|>user\n")


def test_chat_format_only_when_the_model_declares_a_template(tiny_dir):
    from qwen3next.eval.passkey import has_chat_template

    assert has_chat_template(DEFAULT_MODEL)  # tokenizer_config.json carries the ChatML template
    assert not has_chat_template(tiny_dir)  # the tokenizer would fall back to the built-in one


# ---- the command line ------------------------------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = cli_main(["eval", *map(str, args)])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("args,needle", [
    (["ppl", "--context", "0"], "--context"),
    (["ppl", "--context", "x"], "--context"),
    (["ppl", "--bucket-size", "-3"], "--bucket-size"),
    (["passkey"], "--lengths"),
    (["passkey", "--lengths", "100", "--depths", "1.5"], "--depths"),
    (["passkey", "--lengths", "100", "--format", "json"], "--format"),
    (["passkey", "--lengths", "100", "--hf-overrides", "{not json"], "--hf-overrides"),
    (["bogus"], "invalid choice"),
    (["ppl", "--model", "/nonexistent"], "--model"),
])
def test_bad_arguments_exit_2_naming_the_flag(capsys, args, needle):
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_bad_inputs_are_clear_errors(capsys, tiny_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Emma Woodhouse, handsome, clever, and rich.", encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    cases = [
        (["ppl", "--text", tmp_path / "missing.txt"], "--text"),
        (["ppl", "--text", binary], "--text"),
        (["ppl", "--text", "austen:middlemarch"], "austen:emma"),
        (["ppl", "--text", short, "--context", "4096"], "--context"),
        (["ppl", "--text", PASSAGES, "--context", "64", "--bucket-size", "128"], "--bucket-size"),
        (["ppl", "--text", PASSAGES, "--baseline"], "--baseline"),
        (["ppl", "--text", PASSAGES, "--json", tmp_path / "no" / "such" / "dir.json"], "--json"),
        (["passkey", "--text", PASSAGES, "--lengths", "8"], "--lengths"),
        (["passkey", "--text", PASSAGES, "--lengths", "600"], "--lengths"),  # past the model's 512 positions
    ]
    for args, needle in cases:
        rc, _, err = run_cli(capsys, *args, "--model", tiny_dir, "--threads", "1")
        assert rc == 1, (args, err)
        assert err.startswith("qwen3next eval: error: ") and needle in err, (args, err)


def test_ppl_command_reports_buckets_json_and_png(capsys, tiny_dir, tmp_path):
    rc, out, err = run_cli(capsys, "ppl", "--model", tiny_dir, "--text", PASSAGES, "--context", "256", "128",
                           "--bucket-size", "64", "--max-windows", "3", "--chunk-size", "50", "--threads", "1",
                           "--json", tmp_path / "ppl.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "ppl.json").read_text())
    (run,) = report["runs"]
    assert run["hf_overrides"] is None and [c["context"] for c in run["contexts"]] == [256, 128]
    # the same numbers from the windows scored independently (one full forward each)
    model = load_model(tiny_dir, dtype=torch.float32)
    ids = Tokenizer.from_dir(tiny_dir).encode(PASSAGES.read_text(encoding="utf-8"))
    assert report["text"]["tokens"] == len(ids)
    for ctx in run["contexts"]:
        L = ctx["context"]
        assert ctx["windows"] == 3 and ctx["bucket_size"] == 64
        with torch.no_grad():
            nll = torch.stack([reference_nll(model, torch.tensor(ids[i * L:(i + 1) * L])) for i in range(3)])
        assert ctx["tokens"] == 3 * (L - 1)
        for b, bucket in enumerate(ctx["buckets"]):
            part = nll[:, max(b * 64 - 1, 0):(b + 1) * 64 - 1]  # column j scores position j + 1
            assert bucket["tokens"] == part.numel()
            assert bucket["nll"] == pytest.approx(part.mean().item(), abs=1e-5)
        assert f"{ctx['nll']:.4f}" in out
    assert "0-64" in out and "192-256" in out


def test_ppl_with_hf_overrides_and_baseline(capsys, tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    rc, out, err = run_cli(capsys, "ppl", "--model", tiny_dir, "--text", PASSAGES, "--context", "1024",
                           "--max-windows", "1", "--threads", "1", "--hf-overrides", json.dumps(YARN), "--baseline",
                           "--json", tmp_path / "ppl.json", "--plot", tmp_path / "ppl.png")
    assert rc == 0, err
    report = json.loads((tmp_path / "ppl.json").read_text())
    shipped, yarn = report["runs"]
    assert shipped["hf_overrides"] is None and yarn["hf_overrides"] == YARN
    assert shipped["max_context_len"] == 512 and yarn["max_context_len"] == 2048
    assert "YaRN: 512 x factor 4" in yarn["label"] and "no rope scaling" in shipped["label"]
    # positions before the original context differ only through YaRN's attention scaling; both runs are reported
    assert [b["nll"] for b in shipped["contexts"][0]["buckets"]] != [b["nll"] for b in yarn["contexts"][0]["buckets"]]
    assert "*" in out  # buckets past the trained context are marked
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppl_with_yarn_that_omits_the_original_length(capsys, tiny_dir, tmp_path):
    """original_max_position_embeddings defaults to max_position_embeddings (512): the label names it."""
    overrides = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    rc, out, err = run_cli(capsys, "ppl", "--model", tiny_dir, "--text", PASSAGES, "--context", "128",
                           "--max-windows", "1", "--threads", "1", "--hf-overrides", json.dumps(overrides),
                           "--json", tmp_path / "ppl.json")
    assert rc == 0, err
    (run,) = json.loads((tmp_path / "ppl.json").read_text())["runs"]
    assert "YaRN: 512 x factor 2" in run["label"] and run["max_context_len"] == 1024
    assert "Traceback" not in err


def test_passkey_command_runs_the_grid_through_the_engine(capsys, tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    # 600 tokens are past the model's 512 positions: allowed by YaRN x4 (max_context_len 2048)
    rc, out, err = run_cli(capsys, "passkey", "--model", tiny_dir, "--text", PASSAGES, "--lengths", "600", "300",
                           "--depths", "1", "0", "--trials", "2", "--max-tokens", "4", "--threads", "1",
                           "--format", "plain", "--hf-overrides", json.dumps(YARN), "--json", tmp_path / "pk.json",
                           "--plot", tmp_path / "pk.png")
    assert rc == 0, err
    report = json.loads((tmp_path / "pk.json").read_text())
    assert report["lengths"] == [300, 600] and report["depths"] == [0.0, 1.0] and report["format"] == "plain"
    assert report["hf_overrides"] == YARN and report["rope"] == "YaRN: 512 x factor 4"
    assert len(report["results"]) == 2 * 2 * 2
    for r in report["results"]:
        assert r["correct"] == is_correct(r["answer"], r["key"]) and len(r["key"]) == 5
    for n in ("300", "600"):
        for d in ("0.0", "1.0"):
            cell = [r["correct"] for r in report["results"] if str(r["length"]) == n and str(r["depth"]) == d]
            assert report["accuracy"][n][d] == sum(cell) / 2
    assert len({r["key"] for r in report["results"]}) > 1
    assert "depth \\ length" in out
    assert (tmp_path / "pk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_austen_fetch_is_a_clear_error(capsys, tiny_dir, monkeypatch):
    """apt-get or dpkg-deb failing (no network, a broken .deb) is an error naming --text, never a traceback."""
    import qwen3next.train.corpus as corpus

    def fake_run(cmd, cwd=None, **kwargs):
        if cmd[:2] == ["apt-get", "download"]:  # "downloads" a broken .deb that dpkg-deb then refuses
            (Path(cwd) / f"{cmd[2]}_1.0_all.deb").write_bytes(b"not a deb")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 2, "", "dpkg-deb: error: not a Debian format archive")

    monkeypatch.setattr(corpus.subprocess, "run", fake_run)
    rc, _, err = run_cli(capsys, "ppl", "--model", tiny_dir, "--text", "austen:emma", "--context", "64",
                         "--threads", "1")
    assert rc == 1 and "--text austen:emma: could not fetch" in err and "dpkg-deb -x" in err, err
    assert "not a Debian format archive" in err and "Traceback" not in err


def test_plot_without_matplotlib_says_how_to_install(capsys, tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without it: `import matplotlib` fails
    rc, _, err = run_cli(capsys, "ppl", "--model", tiny_dir, "--text", PASSAGES, "--context", "64", "--plot",
                         "x.png")
    assert rc == 1 and "--plot" in err and "pip install 'qwen3next[plot]'" in err


# ---- tool-call scoring (moved here from train/) ----------------------------------------------------------------------
def test_tool_call_scoring_through_the_engine(tmp_path):
    from qwen3next.engine.llm import Engine
    from qwen3next.eval.tool_calls import evaluate_tool_calls
    from qwen3next.train.synthetic import write_synthetic

    write_synthetic(tmp_path, n_train=4, n_heldout=1, seed=0, n_tool_eval=4)
    rows = [json.loads(line) for line in (tmp_path / "tool_eval.jsonl").read_text().splitlines()]
    engine = Engine(DEFAULT_MODEL, max_memory="64MiB", max_num_seqs=4, max_model_len=512)
    stats = evaluate_tool_calls(engine, rows, max_tokens=48)
    assert stats["total"] == 4 and stats["calls_expected"] == sum(bool(r["expected_tool_calls"]) for r in rows)
    # the model card's numbers on the 200 prompts these 4 open: every decision right, every block well formed
    assert stats["decision_rate"] == 1.0 and stats["well_formed_rate"] == 1.0


# ---- dependency direction --------------------------------------------------------------------------------------------
def test_train_does_not_import_the_engine():
    """Dependencies flow one way: train/ uses model/checkpoint, never the engine, the server or eval (an AST scan
    catches imports inside functions too; the subprocess catches indirect ones)."""
    forbidden = ("qwen3next.engine", "qwen3next.server", "qwen3next.eval")
    for file in (ROOT / "qwen3next" / "train").rglob("*.py"):
        package = ".".join(file.relative_to(ROOT).parent.parts)  # qwen3next.train or qwen3next.train.sources
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module, *(f"{module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{file.relative_to(ROOT)} imports {bad[0]}"
    code = ("import importlib, pkgutil, sys, qwen3next.train as t\n"
            "for m in pkgutil.walk_packages(t.__path__, 'qwen3next.train.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('qwen3next.engine', 'qwen3next.server', "
            "'qwen3next.eval'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_model_card_entry_point_moved_to_eval():
    from qwen3next.eval.model_card import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert not (ROOT / "qwen3next" / "train" / "model_card.py").exists()
    card = (DEFAULT_MODEL / "README.md").read_text(encoding="utf-8")
    assert "python -m qwen3next.eval.model_card" in card and "train.model_card" not in card
