"""Checkpoint I/O: save/load round trips (fp32, bf16, sharded), the official on-disk layout, the transformers v5
packed-expert layout, interoperability with transformers in both directions, and clean errors for broken files."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next.checkpoint import CheckpointError, hf_tensors, load_model, parse_dtype
from qwen3next.model.batch import BatchInfo
from tiny_models import config_dict, make_model

IDS = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(5))


def logits(model: Qwen3NextForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def mtp_logits(model: Qwen3NextForCausalLM) -> torch.Tensor:
    """Draft logits of the MTP head for one sequence: hidden state at t and token t+1 -> logits for t+2."""
    tokens = IDS[0]
    T = tokens.shape[0]
    with torch.no_grad():
        h = model.hidden_states(tokens, model.context(BatchInfo([T])))
        d = model.mtp_hidden(h[:-1], tokens[1:], model.context(BatchInfo([T - 1])))
        return model.lm_head(d)


def assert_same_parameters(a: Qwen3NextForCausalLM, b: Qwen3NextForCausalLM) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n, p in pa.items():
        assert p.dtype == pb[n].dtype, n
        assert torch.equal(p, pb[n]), n


def names_in(file: Path) -> list[str]:
    with safe_open(file, "pt") as f:
        return list(f.keys())


def file_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        t = load_file(f)
        assert not out.keys() & t.keys()
        out.update(t)
    return out


def custom_model(**overrides) -> Qwen3NextForCausalLM:
    d = {**config_dict("base"), **overrides}
    model = Qwen3NextForCausalLM(Qwen3NextConfig.from_dict(d))
    model.init_weights(torch.Generator().manual_seed(3))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 and not n.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def base_model() -> Qwen3NextForCausalLM:
    return make_model("base")


@pytest.fixture(scope="module")
def saved(base_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    base_model.save_pretrained(d)
    return d


# ---- round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["base", "mlp_only", "yarn"])
def test_fp32_round_trip_is_exact(name, tmp_path):
    model = make_model(name)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32  # the saved config's torch_dtype is the default
    assert loaded.config.torch_dtype == "float32"
    assert {**loaded.config.to_dict(), "torch_dtype": None} == {**model.config.to_dict(), "torch_dtype": None}
    assert loaded.mtp is not None
    assert any(n.startswith("mtp.") for n, _ in loaded.named_parameters())
    assert_same_parameters(loaded, model)
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(mtp_logits(loaded), mtp_logits(model))


def test_fp32_checkpoint_loads_as_bf16(base_model, saved):
    loaded = Qwen3NextForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    ref = copy.deepcopy(base_model).to(torch.bfloat16)
    assert_same_parameters(loaded, ref)
    # RoPE frequencies are recomputed in fp32, not rounded to the weights' dtype.
    assert loaded.rope_inv_freq.dtype == torch.float32
    assert torch.equal(loaded.rope_inv_freq, base_model.rope_inv_freq)
    # Module.to(bfloat16) also rounds the inv_freq buffer (a model-side issue); compare against the fp32 table.
    ref.rope_inv_freq = base_model.rope_inv_freq.clone()
    assert logits(loaded).dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(ref))
    assert torch.equal(mtp_logits(loaded), mtp_logits(ref))


def test_bf16_checkpoint_round_trip(base_model, tmp_path):
    model = copy.deepcopy(base_model).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)  # dtype from config.json
    assert_same_parameters(loaded, model)
    as32 = Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype="float32")
    assert_same_parameters(as32, copy.deepcopy(model).float())


def test_tied_embeddings_round_trip(tmp_path):
    model = custom_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in file_tensors(tmp_path)
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_parameters(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


# ---- sharding -------------------------------------------------------------------------------------------------------
def test_sharded_save_and_load(base_model, tmp_path):
    base_model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = {}
    for s in shards:
        shard = load_file(tmp_path / s)
        assert all(index["weight_map"][k] == s for k in shard)
        tensors.update(shard)
        # every shard but one holding a single oversized tensor respects the limit
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= 40_000 or len(shard) == 1
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert_same_parameters(loaded, base_model)
    assert torch.equal(logits(loaded), logits(base_model))
    assert torch.equal(mtp_logits(loaded), mtp_logits(base_model))

    # several shards without an index: found by globbing
    (tmp_path / "model.safetensors.index.json").unlink()
    assert_same_parameters(Qwen3NextForCausalLM.from_pretrained(tmp_path), base_model)

    # saving again unsharded replaces the shards (no stale files that a glob would pick up)
    base_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---- the official layout on disk ------------------------------------------------------------------------------------
def expected_qkvz_rows(c: Qwen3NextConfig) -> list[int]:
    """Logical row of each on-disk row of in_proj_qkvz, built by hand: on disk the rows are grouped per key head g as
    [q_g (K) | k_g (K) | v of g's r value heads (r*V) | z of the same heads (r*V)]."""
    H, K, V, r = c.linear_num_key_heads, c.linear_key_head_dim, c.linear_value_head_dim, \
        c.linear_num_value_heads // c.linear_num_key_heads
    HV = H * r
    q0, k0, v0, z0 = 0, H * K, 2 * H * K, 2 * H * K + HV * V  # logical block offsets
    rows = []
    for g in range(H):
        rows += [q0 + g * K + d for d in range(K)]
        rows += [k0 + g * K + d for d in range(K)]
        for j in range(r):
            rows += [v0 + (g * r + j) * V + d for d in range(V)]
        for j in range(r):
            rows += [z0 + (g * r + j) * V + d for d in range(V)]
    return rows


def expected_ba_rows(c: Qwen3NextConfig) -> list[int]:
    H = c.linear_num_key_heads
    r = c.linear_num_value_heads // H
    HV = H * r
    rows = []
    for g in range(H):
        rows += [g * r + j for j in range(r)]  # b of value heads g*r .. g*r+r-1
        rows += [HV + g * r + j for j in range(r)]  # then a
    return rows


def expected_names(c: Qwen3NextConfig) -> set[str]:
    def moe(prefix: str) -> set[str]:
        names = {f"{prefix}.mlp.gate.weight", f"{prefix}.mlp.shared_expert_gate.weight"}
        names |= {f"{prefix}.mlp.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        names |= {f"{prefix}.mlp.experts.{e}.{p}.weight" for e in range(c.num_experts)
                  for p in ("gate_proj", "up_proj", "down_proj")}
        return names

    attn = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i, t in enumerate(c.layer_types):
        p = f"model.layers.{i}"
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        if t == "linear_attention":
            names |= {f"{p}.linear_attn.{n}" for n in ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight",
                                                       "A_log", "dt_bias", "norm.weight", "out_proj.weight")}
        else:
            names |= {f"{p}.self_attn.{n}.weight" for n in attn}
        names |= moe(p) if c.is_moe_layer(i) else {f"{p}.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    for i in range(c.num_nextn_predict_layers):
        p = f"mtp.layers.{i}"
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        names |= {f"{p}.self_attn.{n}.weight" for n in attn} | moe(p)
    if c.num_nextn_predict_layers:
        names |= {f"mtp.{n}.weight" for n in ("fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    return names


@pytest.mark.parametrize("overrides", [{}, {"linear_num_key_heads": 2, "linear_num_value_heads": 6},
                                       {"linear_num_key_heads": 3, "linear_num_value_heads": 3,
                                        "mlp_only_layers": [2]}])
def test_saved_files_use_the_official_layout(overrides, tmp_path):
    model = custom_model(**overrides)
    c = model.config
    model.save_pretrained(tmp_path)
    on_disk = file_tensors(tmp_path)
    assert set(on_disk) == expected_names(c)
    assert not any(re.search(r"experts\.(gate_up_proj|down_proj)$", n) for n in on_disk)
    assert dict(hf_tensors(model)).keys() == on_disk.keys()
    params = dict(model.named_parameters())
    inter = c.moe_intermediate_size
    for prefix in ["model.layers.0", "mtp.layers.0"]:
        gate_up, down = params[f"{prefix}.mlp.experts.gate_up_proj"], params[f"{prefix}.mlp.experts.down_proj"]
        for e in range(c.num_experts):
            assert torch.equal(on_disk[f"{prefix}.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :inter])
            assert torch.equal(on_disk[f"{prefix}.mlp.experts.{e}.up_proj.weight"], gate_up[e, inter:])
            assert torch.equal(on_disk[f"{prefix}.mlp.experts.{e}.down_proj.weight"], down[e])
    for i in c.linear_layers:
        p = f"model.layers.{i}.linear_attn"
        qkvz, ba = params[f"{p}.in_proj_qkvz.weight"], params[f"{p}.in_proj_ba.weight"]
        assert torch.equal(on_disk[f"{p}.in_proj_qkvz.weight"], qkvz[expected_qkvz_rows(c)])
        assert torch.equal(on_disk[f"{p}.in_proj_ba.weight"], ba[expected_ba_rows(c)])
        # the conv keeps the logical [q|k|v] channel order
        assert torch.equal(on_disk[f"{p}.conv1d.weight"], params[f"{p}.conv1d.weight"])
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert_same_parameters(loaded, model)


def test_expected_interleaving_matches_official_row_formulas():
    """The hand-built permutation agrees with the per-group row formulas on the official sizes (group g starts at
    on-disk row g * (2K + 2rV))."""
    c = Qwen3NextConfig.from_dict({})
    rows = expected_qkvz_rows(c)
    assert len(rows) == 12288 and sorted(rows) == list(range(12288))
    inv = {logical: disk for disk, logical in enumerate(rows)}
    g, d = 5, 17
    assert inv[g * 128 + d] == 768 * g + d  # q head g
    assert inv[2048 + g * 128 + d] == 768 * g + 128 + d  # k head g
    for j in (0, 1):
        assert inv[4096 + (2 * g + j) * 128 + d] == 768 * g + 256 + 128 * j + d  # v head 2g+j
        assert inv[8192 + (2 * g + j) * 128 + d] == 768 * g + 512 + 128 * j + d  # z head 2g+j
    ba = expected_ba_rows(c)
    assert ba[4 * g: 4 * g + 4] == [2 * g, 2 * g + 1, 32 + 2 * g, 32 + 2 * g + 1]


# ---- transformers v5 packed experts ---------------------------------------------------------------------------------
def pack_experts(src, dst=None) -> dict[str, torch.Tensor]:
    """Rewrite the single-file checkpoint in `src` (into `dst`, default in place) with transformers v5's packed
    experts: per layer one gate_up_proj [E, 2I, D] and one down_proj [E, D, I]; returns the tensors written."""
    from pathlib import Path

    src, dst = Path(src), Path(dst or src)
    E = json.loads((src / "config.json").read_text())["num_experts"]
    tensors = load_file(src / "model.safetensors")
    packed = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m is None:
            packed[name] = t
    for prefix in {re.sub(r"\.\d+\.\w+\.weight$", "", n) for n in tensors if ".mlp.experts." in n}:
        packed[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]])
             for e in range(E)])  # [E, 2I, D]
        packed[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(E)])
    save_file(packed, dst / "model.safetensors")
    if dst != src:
        (dst / "config.json").write_text((src / "config.json").read_text())
    return packed


def test_packed_expert_layout_loads(base_model, saved, tmp_path):
    c = base_model.config
    tensors = load_file(saved / "model.safetensors")
    packed = pack_experts(saved, tmp_path)
    prefix = "model.layers.0.mlp.experts"
    assert packed[f"{prefix}.down_proj"].shape == (c.num_experts, c.hidden_size, c.moe_intermediate_size)
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert_same_parameters(loaded, base_model)
    assert torch.equal(logits(loaded), logits(base_model))
    assert torch.equal(mtp_logits(loaded), mtp_logits(base_model))

    # both layouts at once is ambiguous: the per-expert copies are reported as unexpected
    packed["model.layers.0.mlp.experts.0.gate_proj.weight"] = tensors["model.layers.0.mlp.experts.0.gate_proj.weight"]
    save_file(packed, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        load_model(tmp_path)


# ---- interoperability with transformers -----------------------------------------------------------------------------
def test_transformers_loads_what_we_save_without_missing_or_unexpected_keys(tmp_path):
    transformers = pytest.importorskip("transformers")
    # 3 value heads per key head: the interleaving must be right beyond the official ratio of 2
    model = custom_model(linear_num_key_heads=2, linear_num_value_heads=6)
    model.save_pretrained(tmp_path)
    hf, info = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert set(info["missing_keys"]) == set()
    assert set(info["unexpected_keys"]) == set()
    assert set(info["mismatched_keys"]) == set()
    assert not info["error_msgs"]
    with torch.no_grad():
        ref = hf(input_ids=IDS, use_cache=False).logits
    assert (logits(model) - ref).abs().max().item() <= 1e-4


def test_we_load_what_transformers_saves(base_model, saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    on_disk = file_tensors(tmp_path)
    # transformers 5.x converts its packed experts back to the official per-expert names and drops mtp.*
    assert not any(n.startswith("mtp.") for n in on_disk)
    assert set(on_disk) == {n for n in expected_names(base_model.config) if not n.startswith("mtp.")}
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    # no mtp.* tensors: the loader builds the model without its MTP head
    assert loaded.mtp is None and loaded.config.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="no MTP head"):
        mtp_logits(loaded)
    ours = {n: p for n, p in base_model.named_parameters() if not n.startswith("mtp.")}
    theirs = dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for n, p in ours.items():
        assert torch.equal(p, theirs[n]), n
    assert torch.equal(logits(loaded), logits(base_model))
    with torch.no_grad():
        ref = hf(input_ids=IDS, use_cache=False).logits
    assert (logits(loaded) - ref).abs().max().item() <= 1e-4


# ---- errors ---------------------------------------------------------------------------------------------------------
def rewrite(d: Path, edit) -> None:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def expect_error(d: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(d)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert "\n" not in msg and "Traceback" not in msg
    # raised cleanly: no chained library exception behind it
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None
    return msg


def test_missing_tensor(saved, tmp_path):
    d = copy_checkpoint(saved, tmp_path / "ck")
    rewrite(d, lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    expect_error(d, "model.layers.1.linear_attn.A_log", "missing", "model.safetensors", str(d))


def test_missing_expert(saved, tmp_path):
    d = copy_checkpoint(saved, tmp_path / "ck")
    rewrite(d, lambda t: t.pop("mtp.layers.0.mlp.experts.5.up_proj.weight"))
    expect_error(d, "mtp.layers.0.mlp.experts.5.up_proj.weight", "missing")


def test_extra_tensor_and_extra_expert(saved, tmp_path):
    d = copy_checkpoint(saved, tmp_path / "ck")
    rewrite(d, lambda t: t.update({"model.layers.0.linear_attn.extra.weight": torch.zeros(3)}))
    expect_error(d, "model.layers.0.linear_attn.extra.weight", "unexpected", "model.safetensors")
    assert load_model(d, strict=False) is not None  # non-strict loads and ignores it

    d = copy_checkpoint(saved, tmp_path / "ck2")
    # an expert index beyond num_experts (6 experts: 0..5) is not silently dropped or shifted
    rewrite(d, lambda t: t.update({"model.layers.2.mlp.experts.6.down_proj.weight":
                                   t["model.layers.2.mlp.experts.5.down_proj.weight"].clone()}))
    expect_error(d, "model.layers.2.mlp.experts.6.down_proj.weight", "unexpected")


@pytest.mark.parametrize("name", ["model.layers.3.self_attn.k_proj.weight",
                                  "model.layers.0.mlp.experts.2.up_proj.weight",
                                  "model.layers.0.linear_attn.in_proj_qkvz.weight", "mtp.fc.weight"])
def test_wrong_shape(saved, tmp_path, name):
    d = copy_checkpoint(saved, tmp_path / "ck")

    def edit(t):
        t[name] = t[name][:-1].clone()

    rewrite(d, edit)
    good = list(load_file(saved / "model.safetensors")[name].shape)
    bad = [good[0] - 1, *good[1:]]
    expect_error(d, name, "model.safetensors", str(bad), str(good))


def test_truncated_file(saved, tmp_path):
    d = copy_checkpoint(saved, tmp_path / "ck")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = expect_error(d, str(f), "truncated")
    assert re.search(r"tensor '[\w.]+'", msg)


@pytest.mark.parametrize("how", ["json", "length", "all"])
def test_corrupt_header(saved, tmp_path, how):
    d = copy_checkpoint(saved, tmp_path / "ck")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    garbage = bytes(torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).tolist())
    if how == "json":
        data[8:72] = garbage  # inside the JSON header
    elif how == "length":
        data[:8] = garbage[:8]  # the header-length field
    else:
        data = garbage * 100
    f.write_bytes(bytes(data))
    expect_error(d, str(f), "header")


def test_index_points_at_missing_shard(base_model, tmp_path):
    base_model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    first = min(names_in(shards[1]))
    shards[1].unlink()
    msg = expect_error(tmp_path, shards[1].name, "missing", "model.safetensors.index.json")
    assert re.search(r"'[\w.]+'", msg)  # names a tensor it should have held
    assert first not in names_in(shards[0])


def test_index_names_tensor_absent_from_shard(base_model, tmp_path):
    base_model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    right = index["weight_map"]["model.norm.weight"]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
    index["weight_map"]["model.norm.weight"] = wrong
    assert "model.norm.weight" not in names_in(tmp_path / wrong)
    index_file.write_text(json.dumps(index))
    expect_error(tmp_path, wrong, "model.norm.weight")
    index_file.write_text("{not json")
    expect_error(tmp_path, "model.safetensors.index.json")


def test_config_errors(saved, tmp_path):
    d = copy_checkpoint(saved, tmp_path / "ck")
    cfg = d / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**good, "model_type": "llama"}))
    expect_error(d, str(cfg), "model_type", "llama")
    cfg.write_text('{"model_type": "qwen3_next", ')
    expect_error(d, str(cfg), "JSON")
    cfg.write_text(json.dumps({**good, "num_attention_heads": 3}))
    expect_error(d, str(cfg), "num_attention_heads")
    cfg.unlink()
    expect_error(d, "config.json")
    expect_error(tmp_path / "does-not-exist", "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(good))
    expect_error(empty, "safetensors")


def test_mtp_tensors_without_mtp_in_config_are_unexpected(saved, tmp_path):
    d = copy_checkpoint(saved, tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    expect_error(d, "unexpected", "mtp.")


def test_parse_dtype():
    assert parse_dtype(None) == torch.bfloat16
    assert parse_dtype("fp32") == parse_dtype("float32") == torch.float32
    assert parse_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8")
