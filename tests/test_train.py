"""Training library: data packing, losses (against hand computation and transformers), optimizer policy, and the
trainer end to end on the tiny preset (loss goes down, resume is exact, Ctrl-C saves)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from qwen3next import Qwen3NextForCausalLM
from qwen3next.tokenizer import Tokenizer
from qwen3next.train.checkpoints import STATE_FILE
from qwen3next.train.data import DOC_SEPARATOR, PackedDataset, parse_data_specs, split_documents, tokenizer_fingerprint
from qwen3next.train.losses import compute_losses, lm_loss, load_balancing_loss, mtp_loss
from qwen3next.train.optim import is_decayed, lr_at, make_optimizer
from qwen3next.train.presets import PRESETS, padded_vocab_size, preset_config
from qwen3next.train.trainer import add_train_args, run_train

WORDS = ("the cat sat on a mat and dog ran to park with ball red blue green one two three four five six seven eight "
         "nine ten . ,").split()
SPECIALS = [DOC_SEPARATOR, "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer.json (whitespace split) with the separator and ChatML specials."""
    d = tmp_path_factory.mktemp("tok")
    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS, "\n"])}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIALS)
    backend.save(str(d / "tokenizer.json"))
    return d


def _corpus(d: Path, name: str, n_docs: int, seed: int) -> Path:
    """Repetitive toy documents in the corpus.py file convention (each followed by a `<|endoftext|>` line)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start = int(rng.integers(0, 10))
        counting = " ".join(WORDS[13 + (start + i) % 10] for i in range(12))
        docs.append(f"the cat sat on a mat . {counting} . the dog ran to park with red ball .\n")
    path = d / f"{name}.txt"
    path.write_text("".join(doc + DOC_SEPARATOR + "\n" for doc in docs), encoding="utf-8")
    return path


def _args(tok_dir: Path, out: Path, data: list[str], **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    argv = ["--preset", "tiny", "--tokenizer", str(tok_dir), "--output", str(out), "--seq-len", "24",
            "--batch-size", "4", "--threads", "1", "--eval-windows", "4", "--log-every", "0", "--warmup-steps", "2",
            "--lr", "1e-2", "--eval-every", "0", "--save-every", "0", "--val-fraction", "0.05"]
    for d in data:
        argv += ["--data", d]
    args = parser.parse_args(argv)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ---- data ------------------------------------------------------------------------------------------------------------
def test_documents_are_split_and_separated(tok_dir, tmp_path):
    text = f"one two\n{DOC_SEPARATOR}\n\n{DOC_SEPARATOR}\nthree four\n{DOC_SEPARATOR}\n"
    assert split_documents(text) == ["one two\n", "three four\n"]
    assert split_documents("no separator here") == ["no separator here"]
    corpus = pytest.importorskip("qwen3next.train.corpus")  # the demo corpus's file convention round-trips
    docs = ["First doc.\n\nSecond paragraph.\n", "Another one.\n"]
    assert split_documents(corpus.join_documents(docs)) == docs

    tok = Tokenizer.from_dir(tok_dir)
    f = tmp_path / "a.txt"
    f.write_text(text)
    cache = tmp_path / "cache"
    data = PackedDataset.from_groups(parse_data_specs([str(f)]), tok, tokenizer_fingerprint(tok_dir), cache,
                                     seq_len=3, val_fraction=0.0, seed=0)
    sep = tok.token_to_id(DOC_SEPARATOR)
    expected = tok.encode("one two\n") + [sep] + tok.encode("three four\n") + [sep]
    assert data.groups[0].train.tolist() == expected
    assert len(list(cache.glob("*.npy"))) == 1
    # a second load reads the cache (same ids), a changed file gets a new cache entry
    again = PackedDataset.from_groups(parse_data_specs([str(f)]), tok, tokenizer_fingerprint(tok_dir), cache, 3, 0.0, 0)
    assert again.groups[0].train.tolist() == expected
    f.write_text("one two three four five six")
    PackedDataset.from_groups(parse_data_specs([str(f)]), tok, tokenizer_fingerprint(tok_dir), cache, 3, 0.0, 0)
    assert len(list(cache.glob("*.npy"))) == 2


def test_windows_are_deterministic_and_mixed_by_weight(tok_dir, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    (tmp_path / "a.txt").write_text(" ".join(["cat"] * 400))
    (tmp_path / "b.txt").write_text(" ".join(["dog"] * 100))
    specs = parse_data_specs([f"cats={tmp_path / 'a.txt'}:3", f"dogs={tmp_path / 'b.txt'}:1"])
    assert [(g.name, g.weight) for g in specs] == [("cats", 3.0), ("dogs", 1.0)]
    data = PackedDataset.from_groups(specs, tok, tokenizer_fingerprint(tok_dir), tmp_path / "c", seq_len=8,
                                     val_fraction=0.1, seed=5)
    assert len(data.groups[0].val) == 40 and len(data.groups[1].val) == 10  # the tail of each file
    b1, b2 = data.train_batch(7, 0, 400), data.train_batch(7, 0, 400)
    assert b1.shape == (400, 9) and b1.dtype == torch.int64 and torch.equal(b1, b2)
    assert not torch.equal(b1, data.train_batch(8, 0, 400))
    assert not torch.equal(b1, data.train_batch(7, 1, 400))
    cat_rows = (b1 == tok.token_to_id("cat")).all(1).float().mean().item()
    assert 0.65 < cat_rows < 0.85  # 3:1 mixing
    windows = data.eval_windows(10)
    assert set(windows) == {"cats", "dogs"} and windows["cats"].shape == (4, 9) and windows["dogs"].shape == (1, 9)
    with pytest.raises(ValueError, match="weight"):
        parse_data_specs([f"x={tmp_path / 'a.txt'}:2", f"y={tmp_path / 'b.txt'}"])
    with pytest.raises(ValueError, match="neither"):
        parse_data_specs([str(tmp_path / "missing.txt")])


# ---- losses ----------------------------------------------------------------------------------------------------------
def _hand_ce(logits: torch.Tensor, tokens: torch.Tensor, shift: int) -> float:
    """Mean of -log softmax(logits[b, t])[tokens[b, t + shift]] with explicit loops in float64 Python math."""
    total, n = 0.0, 0
    B, L, _ = logits.shape
    for b in range(B):
        for t in range(L):
            if t + shift >= tokens.shape[1]:
                continue
            row = [float(x) for x in logits[b, t]]
            m = max(row)
            log_z = m + math.log(sum(math.exp(x - m) for x in row))
            total += log_z - row[int(tokens[b, t + shift])]
            n += 1
    return total / n


def test_lm_and_mtp_loss_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    V = 11
    tokens = torch.randint(0, V, (2, 6), generator=g)
    logits = torch.randn(2, 6, V, generator=g) * 3
    mtp_logits = torch.randn(2, 5, V, generator=g) * 3  # rows 0..4; row 4 has no target t+2 = 6
    assert lm_loss(logits, tokens).item() == pytest.approx(_hand_ce(logits, tokens, 1), rel=1e-6)
    assert mtp_loss(mtp_logits, tokens).item() == pytest.approx(_hand_ce(mtp_logits, tokens, 2), rel=1e-6)
    # bf16 logits are upcast, not reduced in bf16
    assert mtp_loss(mtp_logits.bfloat16(), tokens).item() == pytest.approx(
        _hand_ce(mtp_logits.bfloat16().float(), tokens, 2), rel=1e-6)


def test_load_balancing_loss_matches_transformers():
    modeling = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    g = torch.Generator().manual_seed(1)
    E, k = 7, 3
    layers = [torch.randn(n, E, generator=g) * 2 for n in (30, 30, 30, 17)]
    ours = load_balancing_loss(layers, E, k)
    ref = modeling.load_balancing_loss_func(tuple(layers), E, k)
    assert ours.item() == pytest.approx(float(ref), rel=1e-6)
    # gradient flows through the mean probabilities
    x = layers[0].clone().requires_grad_(True)
    load_balancing_loss([x], E, k).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_compute_losses_combines_parts():
    config = preset_config("tiny", vocab_size=64)
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    windows = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    r = compute_losses(model, windows, mtp_weight=0.5, aux_coef=0.01, with_accuracy=True)
    assert r.total.item() == pytest.approx((r.lm + 0.5 * r.mtp + 0.01 * r.aux).item(), rel=1e-6)
    assert r.mtp_count == 2 * 7 and r.lm_count == 2 * 8
    # the LM part is the CE of the plain forward's logits
    with torch.no_grad():
        logits = model(windows[:, :8])
    assert r.lm.item() == pytest.approx(_hand_ce(logits, windows, 1), rel=1e-5)
    # near-uniform routing at init: the balance loss is close to top_k
    assert r.aux.item() == pytest.approx(config.num_experts_per_tok, rel=0.2)


# ---- optimizer policy and schedule -----------------------------------------------------------------------------------
def test_weight_decay_policy_and_lr_schedule():
    model = Qwen3NextForCausalLM(preset_config("tiny", vocab_size=64))
    names = dict(model.named_parameters())
    for n in names:
        if n.endswith(("A_log", "dt_bias", "linear_attn.norm.weight")) or n == "model.embed_tokens.weight":
            assert not is_decayed(n), n
        elif n.endswith(("input_layernorm.weight", "q_proj.weight", "experts.gate_up_proj", "lm_head.weight")):
            assert is_decayed(n), n
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_presets_sizes():
    small = preset_config("small").parameter_counts()
    assert round(small["total"] / 1e6) == 151  # the issue's ≈151M total
    assert round((small["active"] + small["embedding"]) / 1e6) == 57  # ≈57M active (counting the embedding)
    demo = preset_config("demo", vocab_size=padded_vocab_size(8192 + 26))
    assert demo.vocab_size == 8256
    assert demo.parameter_counts()["total_with_mtp"] * 2 < 40e6  # bf16 files under 40 MB
    for name in PRESETS:
        c = preset_config(name)
        assert c.layer_types.count("full_attention") * 4 == c.num_hidden_layers  # 3:1 DeltaNet : attention
        assert c.num_nextn_predict_layers == 1 and c.shared_expert_intermediate_size > 0


# ---- trainer end to end ----------------------------------------------------------------------------------------------
def test_training_reduces_loss_and_writes_a_model_dir(tok_dir, tmp_path):
    data = _corpus(tmp_path, "toy", 60, seed=0)
    out = tmp_path / "run"
    assert run_train(_args(tok_dir, out, [str(data)], max_steps=30)) == 0
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[i] for i in (1, 2, 3)]), np.mean([losses[i] for i in (28, 29, 30)])
    assert last < first - 1.0, (first, last)
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert evals and {"val_loss", "val_ppl", "val_mtp_acc"} <= set(evals[-1])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_summary.json"):
        assert (out / f).is_file(), f
    model = Qwen3NextForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.mtp is not None
    tok = Tokenizer.from_dir(out)
    assert model.config.vocab_size == padded_vocab_size(tok.vocab_size)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == tok.eos_token_id


def test_interrupt_saves_and_resume_is_exact(tok_dir, tmp_path):
    data = [f"a={_corpus(tmp_path, 'a', 30, 1)}:2", f"b={_corpus(tmp_path, 'b', 30, 2)}:1"]
    common = {"max_steps": 6, "grad_accum": 2}

    straight = tmp_path / "straight"
    assert run_train(_args(tok_dir, straight, data, **common)) == 0

    def interrupt_at_3(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    split = tmp_path / "split"
    assert run_train(_args(tok_dir, split, data, **common), on_step=interrupt_at_3) == 130
    ckpt = split / "checkpoint-0000003"
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert state["step"] == 3
    assert Qwen3NextForCausalLM.from_pretrained(ckpt).config.num_experts == PRESETS["tiny"]["num_experts"]
    assert not (split / "model.safetensors").exists()  # the final model is written only at the end

    assert run_train(_args(tok_dir, split, data, resume="latest", **common)) == 0
    a, b = _train_losses(straight), _train_losses(split)
    assert sorted(b) == list(range(1, 7))
    assert [a[i] for i in range(1, 7)] == [b[i] for i in range(1, 7)]  # bit-identical losses
    wa = torch.load(straight / "checkpoint-0000006" / STATE_FILE, weights_only=False)["model"]
    wb = torch.load(split / "checkpoint-0000006" / STATE_FILE, weights_only=False)["model"]
    assert all(torch.equal(wa[n], wb[n]) for n in wa)

    # fine-tuning from the finished model dir (its tokenizer files included) starts from the trained weights
    tuned = tmp_path / "tuned"
    assert run_train(_args(tok_dir, tuned, data, preset=None, init_from=str(straight), tokenizer=None,
                           max_steps=1)) == 0
    assert _train_losses(tuned)[1] < a[1] - 0.5


def test_bad_arguments_are_reported(tok_dir, tmp_path, capsys):
    data = _corpus(tmp_path, "toy", 5, seed=0)
    assert run_train(_args(tok_dir, tmp_path / "o", [str(data)], max_steps=0)) == 2
    assert "--max-steps" in capsys.readouterr().err
    assert run_train(_args(tok_dir, tmp_path / "o", [str(data)], config="x.json")) == 2
    assert "one of --preset" in capsys.readouterr().err
