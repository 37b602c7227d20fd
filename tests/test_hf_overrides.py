"""`hf_overrides` (vLLM's option name, our merge rule): config.json values changed at load, through the config, the
loader, the engine and every command line that loads a model; YaRN through an override against transformers' YaRN at
2x the original context; `max_model_len` up to the YaRN-scaled length."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_config import OFFICIAL

from qwen3next.checkpoint import load_model
from qwen3next.cli import build_parser
from qwen3next.cli import main as cli_main
from qwen3next.config import Qwen3NextConfig, RopeConfig, apply_hf_overrides
from qwen3next.engine.llm import Engine
from qwen3next.engine.sampling import SamplingParams
from tiny_models import make_model, write_byte_tokenizer

ORIGINAL = 64  # the tiny model's native context
YARN_V4 = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL}}
YARN_V5 = {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL}}
YARN_80B = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with a 64-token native context, saved by us (config.json in the v5 rope spelling, plus the v4
    rope_theta / partial_rotary_factor keys), with a byte tokenizer."""
    d = tmp_path_factory.mktemp("hf_overrides_model")
    make_model("base", vocab_size=261, partial_rotary_factor=0.5, max_position_embeddings=ORIGINAL).save_pretrained(d)
    write_byte_tokenizer(d)
    assert json.loads((d / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    return d


# ---- merging ---------------------------------------------------------------------------------------------------------
def yarn(factor: float, original: int | None, theta: float = 1e7, partial: float = 0.25) -> RopeConfig:
    return RopeConfig(theta=theta, partial_rotary_factor=partial, rope_type="yarn", factor=factor,
                      original_max_position_embeddings=original)


V5_FILE = {k: v for k, v in OFFICIAL.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling")}
V5_FILE["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}


@pytest.mark.parametrize("file", [OFFICIAL, V5_FILE], ids=["v4_file", "v5_file"])
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_the_override_wins_whatever_the_spellings(file, spelling):
    override = {spelling: dict(YARN_80B["rope_scaling"])}
    c = Qwen3NextConfig.from_dict(file, hf_overrides=override)
    assert c.rope == yarn(4.0, 262144)
    assert c.max_context_len == 1_048_576  # 262,144 x 4 (vLLM's rule)
    assert c.max_position_embeddings == 262144  # only what the override names changes


def test_yarn_files_are_overridden_and_turned_off():
    v4_yarn = {**OFFICIAL, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}}
    v5_yarn = {**V5_FILE, "rope_parameters": {**V5_FILE["rope_parameters"], **YARN_80B["rope_scaling"]}}
    for file in (v4_yarn, v5_yarn):
        # a nested object merges: only the factor changes, the type and original length stay the file's
        assert Qwen3NextConfig.from_dict(file, {"rope_parameters": {"factor": 2.0}}).rope == yarn(2.0, 262144)
        assert Qwen3NextConfig.from_dict(file, {"rope_scaling": {"factor": 2.0}}).rope == yarn(2.0, 262144)
        # null switches scaling off; the theta stays
        off = Qwen3NextConfig.from_dict(file, {"rope_scaling": None})
        assert off.rope == RopeConfig(theta=1e7, partial_rotary_factor=0.25) and off.max_context_len == 262144
    # v4's "type" spelling inside an override, and the theta given the v4 way
    c = Qwen3NextConfig.from_dict(V5_FILE, {"rope_scaling": {"type": "yarn", "factor": 3.0}, "rope_theta": 5e6})
    assert c.rope == yarn(3.0, None, theta=5e6)
    assert c.max_context_len == 3 * 262144  # the original length defaults to max_position_embeddings


def test_other_keys_merge_recursively_lists_and_scalars_replace():
    """Our rule, not vLLM's: an object value merges into the file's key by key (vLLM would replace the file's whole
    quantization_config with {"bits": 4}); lists and scalars replace."""
    base = {"quantization_config": {"quant_method": "x", "bits": 8, "group_size": 64}, "mlp_only_layers": [1, 2],
            "max_position_embeddings": 100}
    before = json.dumps(base, sort_keys=True)
    out = apply_hf_overrides(base, {"quantization_config": {"bits": 4}, "mlp_only_layers": [3],
                                    "max_position_embeddings": 200})
    assert out == {"quantization_config": {"quant_method": "x", "bits": 4, "group_size": 64}, "mlp_only_layers": [3],
                   "max_position_embeddings": 200}
    assert json.dumps(base, sort_keys=True) == before  # the file's dict is not modified
    c = Qwen3NextConfig.from_dict(OFFICIAL, {"max_position_embeddings": 131072, "num_experts_per_tok": 8})
    assert (c.max_position_embeddings, c.num_experts_per_tok, c.max_context_len) == (131072, 8, 131072)


@pytest.mark.parametrize("override,needle", [
    ({"rope_scalng": {"factor": 2.0}}, "'rope_scalng'"),
    ({"max_position_embedings": 1}, "'max_position_embedings'"),
    ({"rope_scaling": {"rope_type": "yarn", "factr": 2.0}}, "rope_scaling.factr"),
    ({"rope_parameters": "yarn"}, "rope_parameters: expected an object"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "factor: expected a number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "factor: expected >= 1"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": -5}}, "original_max_position"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
])
def test_bad_overrides_are_errors_naming_the_key(override, needle):
    with pytest.raises(ValueError) as err:
        Qwen3NextConfig.from_dict(OFFICIAL, override)
    assert needle in str(err.value)
    with pytest.raises(ValueError, match="hf_overrides"):
        Qwen3NextConfig.from_dict(OFFICIAL, [YARN_80B])


def test_ignored_hf_keys_are_accepted_and_change_nothing():
    c = Qwen3NextConfig.from_dict(OFFICIAL, {"use_sliding_window": True, "attention_dropout": 0.1, "use_cache": False})
    assert c == Qwen3NextConfig.from_dict(OFFICIAL)


# ---- YaRN through an override, against transformers -------------------------------------------------------------
def transformers_yarn(model_dir, factor: float):
    """transformers' model with YaRN set on ITS config object (independently of our override code)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                           "factor": factor, "original_max_position_embeddings": ORIGINAL}
    return transformers.Qwen3NextForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32).eval()


def test_yarn_override_matches_transformers_at_twice_the_original_context(model_dir):
    hf = transformers_yarn(model_dir, 2.0)
    ids = torch.randint(0, 261, (2, 2 * ORIGINAL), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        plain = load_model(model_dir, dtype=torch.float32)(ids)
        for override in (YARN_V4, YARN_V5):
            model = load_model(model_dir, dtype=torch.float32, hf_overrides=override)
            assert model.config.rope.rope_type == "yarn" and model.config.max_context_len == 2 * ORIGINAL
            err = (model(ids) - ref).abs().max().item()
            assert err <= 1e-4, f"{override}: max |dlogits| = {err}"
    # the override matters: without it the logits past the first positions differ
    assert (plain - ref)[:, ORIGINAL:].abs().max().item() > 1e-2


def test_official_yarn_recipe_matches_transformers_frequencies():
    """The model card's recipe on the 80B config: the 32 rotary frequencies and the cos/sin scale (0.1 ln 4 + 1)
    equal transformers' own YaRN computation."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qwen3next.ops.rope import rope_inv_freq

    ours = Qwen3NextConfig.from_dict(OFFICIAL, YARN_80B)
    inv_freq, scale = rope_inv_freq(ours.rope, ours.rotary_dim, ours.max_position_embeddings)
    theirs = transformers.Qwen3NextConfig(head_dim=256, max_position_embeddings=262144, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25, **YARN_80B["rope_scaling"]})
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    assert inv_freq.shape == (32,) and torch.equal(inv_freq, ref_freq)
    assert scale == pytest.approx(ref_scale, abs=1e-12) and scale == pytest.approx(0.1 * math.log(4) + 1, abs=1e-12)


def test_engine_runs_to_the_yarn_length_and_refuses_beyond(model_dir):
    limit = 2 * ORIGINAL
    with pytest.raises(ValueError) as err:
        Engine(model_dir, max_memory="16MiB", max_model_len=limit)
    msg = str(err.value)
    assert f"max_model_len: {limit}" in msg and f"context of {ORIGINAL} tokens" in msg and "hf_overrides" in msg
    with pytest.raises(ValueError) as err:
        Engine(model_dir, max_memory="16MiB", max_model_len=limit + 1, hf_overrides=YARN_V4)
    assert f"context of {limit} tokens" in str(err.value) and "factor 2" in str(err.value)

    engine = Engine(model_dir, max_memory="16MiB", max_model_len=limit, hf_overrides=YARN_V4, prefill_chunk_size=32)
    assert engine.max_model_len == limit
    prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    req = engine.add_request(prompt, SamplingParams(max_tokens=limit - 100, temperature=0.0, ignore_eos=True))
    while engine.step():
        pass
    out = req.output().outputs[0].token_ids
    assert len(out) == limit - 100
    # transformers with YaRN, greedy over full forwards, gives the same tokens
    hf = transformers_yarn(model_dir, 2.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(limit - 100):
            ids.append(int(hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert out == ids[100:]


def test_engine_refuses_overrides_for_a_model_object(model_dir):
    from qwen3next.tokenizer import Tokenizer

    model = load_model(model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="hf_overrides"):
        Engine(model, tokenizer=Tokenizer.from_dir(model_dir), hf_overrides=YARN_V4)


# ---- command lines ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench", "info"])
def test_every_model_command_takes_the_flag(command):
    extra = ["--prompt", "x"] if command == "generate" else []
    args = build_parser(command).parse_args([command, *extra, "--hf-overrides", json.dumps(YARN_V4)])
    assert args.hf_overrides == YARN_V4
    assert build_parser(command).parse_args([command, *extra]).hf_overrides is None


@pytest.mark.parametrize("value,needle", [
    ("{bad json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('"yarn"', "expected a JSON object"),
    ('{"rope_scalng": {"factor": 2}}', "unknown config key 'rope_scalng'"),
    ('{"rope_scaling": {"factr": 2}}', "rope_scaling.factr"),
])
def test_bad_flag_values_are_argparse_errors(value, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser("generate").parse_args(["generate", "--prompt", "x", "--hf-overrides", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--hf-overrides" in err and needle in err and "Traceback" not in err


def test_generate_with_yarn_beyond_the_native_context(model_dir, capsys):
    prompt = "a" * 90  # 90 byte tokens + 20 new: past the native 64, within the YaRN 128
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-tokens", "20", "--threads", "1",
            "--max-memory", "16MiB", "--max-model-len", "128"]
    assert cli_main(argv) == 1  # without YaRN the context is 64 tokens
    err = capsys.readouterr().err
    assert "max_model_len: 128 exceeds the model's context of 64 tokens" in err and "Traceback" not in err
    assert cli_main([*argv, "--hf-overrides", json.dumps(YARN_V4)]) == 0
    assert capsys.readouterr().out.startswith(prompt)


def test_bench_applies_overrides_to_preset_models():
    from qwen3next.bench.harness import BenchOptions, bench, random_model

    long = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512}}
    model = random_model("tiny", torch.float32, 0, long)  # tiny: max_position_embeddings 512
    assert model.config.rope == yarn(2.0, 512, theta=10000.0) and model.config.max_context_len == 1024
    # the YaRN length (not the native 512) is what the bench checks its prompt lengths against
    with pytest.raises(ValueError, match="exceed the model's context") as err:
        bench(BenchOptions(preset="tiny", threads=1, prefill_lens=[1100], bandwidth_mib=8, hf_overrides=long))
    assert "(1024:" in str(err.value)
