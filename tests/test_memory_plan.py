"""Memory you can plan: `estimate_memory` / `qwen3next info --context` against the official 80B numbers, the prefill
workspace estimate against the peak of torch's CPU allocator measured during a real engine step, and a planner that
admits exactly what fits `max_memory` and says why when it does not."""

from __future__ import annotations

import json

import pytest
import torch
from test_config import OFFICIAL
from torch.profiler import ProfilerActivity, profile

from qwen3next.bench.harness import synthetic_tokenizer
from qwen3next.cli import main as cli_main
from qwen3next.config import Qwen3NextConfig
from qwen3next.engine.block_manager import BlockManager
from qwen3next.engine.llm import Engine
from qwen3next.engine.memory import PrefillPaths, delta_rule_workspace, engine_prefill_paths, estimate_memory
from qwen3next.engine.sampling import SamplingParams
from qwen3next.engine.scheduler import Scheduler, SchedulerConfig
from qwen3next.engine.sequence import Sequence
from qwen3next.model.qwen3_next import Qwen3NextForCausalLM
from qwen3next.ops.gated_delta import chunk_gated_delta_rule
from tiny_models import make_model

KIB, MIB, GIB = 1024, 1024**2, 1024**3
# By hand from the official config: 12 attention layers x (K + V) x 2 KV heads x 256 dims x 2 bytes = 24 KiB per token
# in bf16; 36 DeltaNet layers x (recurrent state 32 heads x 128 x 128 fp32 = 2 MiB + conv state 8,192 channels x 3
# frames x 2 bytes = 48 KiB) = 73.7 MiB per sequence (72 MiB of it the recurrent state).
KV_PER_TOKEN_80B = 24 * KIB
STATE_80B = 36 * (2 * MIB + 48 * KIB)


def test_official_80b_cache_numbers():
    c = Qwen3NextConfig.from_dict(OFFICIAL)
    e = estimate_memory(c, 262144)  # bf16 by default, block size 64
    assert e.kv_bytes == 262144 * KV_PER_TOKEN_80B == 6 * GIB
    assert e.state_bytes == STATE_80B == 77_266_944
    assert e.cache_bytes == e.kv_bytes + e.state_bytes and e.total_bytes == e.cache_bytes + e.workspace_bytes
    # batch multiplies the cache, not the one-chunk workspace; KV is whole blocks (1,000 tokens -> 16 x 64)
    e4 = estimate_memory(c, 1000, batch=4)
    assert (e4.kv_bytes, e4.state_bytes) == (4 * 1024 * KV_PER_TOKEN_80B, 4 * STATE_80B)
    assert e4.workspace_bytes == estimate_memory(c, 1000).workspace_bytes
    # fp32 activations double the KV, not the fp32 recurrent state
    assert estimate_memory(c, 64, dtype_bytes=4).kv_bytes == 64 * 2 * KV_PER_TOKEN_80B
    # at 256K the one-chunk workspace is dominated by attention over the whole context, and it is far below the cache
    assert max((k for k in e.parts if k not in ("resident", "sampling", "total")), key=e.parts.get) == "attention"
    assert 100 * MIB < e.workspace_bytes < e.kv_bytes / 4


@pytest.fixture
def official_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL))
    return tmp_path


def test_info_prints_the_plan(official_dir, capsys):
    assert cli_main(["info", "--model", str(official_dir), "--context", "262144", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    e = estimate_memory(Qwen3NextConfig.from_dict(OFFICIAL), 262144)
    for n in (6 * GIB, STATE_80B, 6 * GIB + STATE_80B, e.workspace_bytes, e.total_bytes):
        assert f"{n:,} B" in out
    assert "24.0 KiB/token" in out and "--max-model-len 262144" in out and "note:" not in out

    yarn = json.dumps({"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 262144}})
    assert cli_main(["info", "--model", str(official_dir), "--context", "1048576", "--batch", "2",
                     "--dtype", "bfloat16", "--hf-overrides", yarn]) == 0
    out = capsys.readouterr().out
    assert "1,048,576 tokens  (YaRN: 262,144 x factor 4)" in out
    assert f"{2 * 1048576 * KV_PER_TOKEN_80B:,} B" in out and f"{2 * STATE_80B:,} B" in out and "note:" not in out
    # beyond the model's context: still planned, with a note saying the engine would refuse it
    assert cli_main(["info", "--model", str(official_dir), "--context", "1048576"]) == 0
    assert "beyond the model's context of 262,144 tokens" in capsys.readouterr().out


# ---- the prefill workspace against a measurement --------------------------------------------------------------------
def peak_bytes(fn) -> int:
    """Peak of torch's CPU allocator during `fn()`, above its level at the start: the profiler's allocation and free
    events (every tensor allocation on the CPU goes through them), summed in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SDPA's per-thread buffers are not part of the estimate
    yield
    torch.set_num_threads(threads)


TINY = {"vocab_size": 512, "num_hidden_layers": 4, "max_position_embeddings": 4096, "intermediate_size": 128,
        "hidden_act": "silu", "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25}
SHAPES = {
    # the largest layer: attention over the context (K/V gathered from scattered blocks, the mask SDPA converts)
    "attention": {**TINY, "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                  "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 2,
                  "linear_num_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64},
    # the MoE (top-10 of 32 experts)
    "moe": {**TINY, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 1,
            "linear_num_value_heads": 2, "num_experts": 32, "num_experts_per_tok": 10, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64},
    # the DeltaNet layer and its chunked delta rule
    "deltanet": {**TINY, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                 "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 4,
                 "linear_num_value_heads": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                 "shared_expert_intermediate_size": 32},
}


CASES = [  # (shape, dtype, native delta rule, attention split, prompt length), each the largest layer of its case
    ("attention", torch.float32, True, False, 1100), ("attention", torch.bfloat16, True, False, 1100),
    ("attention", torch.float32, True, True, 1100), ("attention", torch.bfloat16, True, True, 1100),
    ("attention", torch.float32, True, False, 220), ("attention", torch.bfloat16, True, False, 220),
    ("moe", torch.float32, True, False, 1100), ("moe", torch.bfloat16, False, False, 1100),
    ("deltanet", torch.float32, False, False, 1100), ("deltanet", torch.bfloat16, False, False, 1100),
    ("deltanet", torch.float32, True, False, 1100),
]


@pytest.mark.parametrize("shape,dtype,native,split,prompt_len", CASES)
def test_prefill_workspace_matches_the_measured_peak(shape, dtype, native, split, prompt_len, one_thread,
                                                    monkeypatch):
    """The engine's last prefill chunk of a prompt (the one attending over the most keys; with a 220-token prompt, a
    fresh prompt in one chunk) against the estimate, with the delta rule in C++ or chunked torch, and attention with
    a mask or split (when this build has that path)."""
    from qwen3next import kernels
    from qwen3next.model import attention
    from qwen3next.ops import dispatch

    if native and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.load_error()}")
    config = Qwen3NextConfig.from_dict(SHAPES[shape])
    model = Qwen3NextForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(dtype).eval()
    # prompt 1,100 = 5 chunks of 220: the last chunk's 220 new tokens attend over 1,100 keys. max_model_len
    # prompt + 2 sizes the pool to exactly the prompt's blocks (1,100 or 220 are not multiples of 16); a first
    # one-token request leaves block 0 at the back of the free list, so the prompt's blocks are not consecutive and
    # K/V are gathered, the engine's worst case
    chunk = 220
    engine = Engine(model, tokenizer=synthetic_tokenizer(config.vocab_size), max_memory="1GiB", max_num_seqs=1,
                    max_model_len=prompt_len + 2, prefill_chunk_size=chunk, block_size=16)
    engine.add_request([1], SamplingParams(max_tokens=1))
    while engine.step():
        pass
    ids = torch.randint(0, config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = engine.add_request(ids, SamplingParams(max_tokens=2)).samples[0].seq
    for _ in range(prompt_len // chunk - 1):
        engine.step()
    assert seq.num_computed_tokens == prompt_len - chunk  # the next step is the last chunk
    was_on = kernels.set_enabled(native)
    threshold = dispatch.set_threshold("attention_context_split", 0 if split else 1 << 62) if split else None
    split_calls = []
    real_split = attention.context_split_attention
    monkeypatch.setattr(attention, "context_split_attention", lambda *a: (split_calls.append(1), real_split(*a))[1])
    try:
        paths = engine_prefill_paths(chunk, prompt_len)
        measured = peak_bytes(engine.step)
    finally:
        kernels.set_enabled(was_on)
        if threshold is not None:
            dispatch.set_threshold("attention_context_split", threshold)
    assert seq.num_computed_tokens == prompt_len and seq.block_table[-1] == 0  # scattered blocks: K/V were gathered
    assert paths == PrefillPaths(native_delta_rule=native, context_split=split)
    assert len(split_calls) == (len(config.attention_layers) if split else 0)  # the forward took the path estimated
    e = estimate_memory(config, prompt_len, dtype_bytes=dtype.itemsize, chunk=chunk, paths=paths)
    assert e.parts[shape] == max(e.parts[k] for k in SHAPES)  # the case tests the layer it means to
    # measured on this project's machines: estimate / measured = 0.98 .. 1.07 over these cases (AMD EPYC, AVX2). On a
    # CPU with AMX tiles torch's bf16 attention over a mask takes another kernel, which allocates more than the
    # estimate models (measured 0.80 on an Intel Xeon with AMX, 2026-12-04): a lower bound of 0.75 there.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    low = 0.75 if amx and shape == "attention" and dtype == torch.bfloat16 and not split else 0.85
    assert low <= e.workspace_bytes / measured <= 1.15, (e.parts, measured)


def test_delta_rule_workspace_matches_the_ops(one_thread):
    """The one function that knows the delta rule's internals, against both forms of the op (odd T: a padded chunk)."""
    from qwen3next import kernels

    B, T, H, HV, K, V = 1, 203, 2, 4, 32, 16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen)
    g, beta = -torch.rand(B, T, HV, generator=gen), torch.rand(B, T, HV, generator=gen)
    state = torch.zeros(B, HV, K, V)
    with torch.no_grad():
        measured = peak_bytes(lambda: chunk_gated_delta_rule(q, k, v, g, beta, state))
        assert 0.85 <= delta_rule_workspace(T, H, HV, K, V, native=False) / measured <= 1.15, measured
        if kernels.available():
            measured = peak_bytes(lambda: kernels.gated_delta_rule(q, k, v, g, beta, state))
            assert 0.85 <= delta_rule_workspace(T, H, HV, K, V, native=True) / measured <= 1.15, measured


# ---- the planner: admits exactly what fits, says why not ----------------------------------------------------------
def test_engine_admits_exactly_what_max_memory_holds():
    model = make_model("base", vocab_size=97, max_position_embeddings=1024)
    tok = synthetic_tokenizer(97)
    N, bs = 256, 16
    e = estimate_memory(model.config, N, dtype_bytes=4, block_size=bs)
    engine = Engine(model, tokenizer=tok, max_memory=e.cache_bytes, max_num_seqs=1, max_model_len=N, block_size=bs)
    assert engine.plan.total_bytes == e.cache_bytes
    greedy = dict(temperature=0.0, ignore_eos=True)
    prompt = [t % 97 for t in range(N - 8)]
    req = engine.add_request(prompt, SamplingParams(max_tokens=8, **greedy))  # exactly max_model_len
    while engine.step():
        pass
    assert len(req.output().outputs[0].token_ids) == 8
    with pytest.raises(ValueError) as err:
        engine.add_request(prompt, SamplingParams(max_tokens=9, **greedy))
    assert "max_tokens (9)" in str(err.value) and "max_tokens can be at most 8" in str(err.value)

    with pytest.raises(ValueError) as err:  # one byte less: refused, with what it needs and what would fit
        Engine(model, tokenizer=tok, max_memory=e.cache_bytes - 1, max_num_seqs=1, max_model_len=N, block_size=bs)
    msg = str(err.value)
    assert msg.startswith("max_memory:") and "cannot hold one sequence" in msg and f"{e.cache_bytes:,} B" in msg
    assert f"at most {N - bs} tokens" in msg and "--max-model-len" in msg and "--max-memory" in msg

    # two sequences: the batch-2 cache runs both at once
    e2 = estimate_memory(model.config, N, batch=2, dtype_bytes=4, block_size=bs)
    engine = Engine(model, tokenizer=tok, max_memory=e2.cache_bytes, max_num_seqs=2, max_model_len=N, block_size=bs)
    reqs = [engine.add_request([t % 97 for t in range(i, i + N - 4)], SamplingParams(max_tokens=4, **greedy))
            for i in (0, 1)]
    engine.step()
    assert engine.scheduler.num_running == 2
    while engine.step():
        pass
    assert all(len(r.output().outputs[0].token_ids) == 4 for r in reqs)


def test_scheduler_refusals_say_what_would_fit():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=32),
                      BlockManager(num_blocks=4, block_size=4, num_slots=2))
    with pytest.raises(ValueError) as err:  # 20 + 13 > 32
        sched.add(Sequence("long", list(range(20)), SamplingParams(max_tokens=13)))
    assert "max_tokens can be at most 12" in str(err.value) and "--max-model-len" in str(err.value)
    with pytest.raises(ValueError) as err:  # 10 + 8 - 1 = 17 cached tokens > the pool's 4 x 4
        sched.add(Sequence("big", list(range(10)), SamplingParams(max_tokens=8)))
    assert "only has 4 (16 tokens)" in str(err.value) and "max_tokens can be at most 7" in str(err.value)
    assert "--max-memory" in str(err.value)
    with pytest.raises(ValueError, match="shorten it"):  # the prompt alone is longer than the pool
        sched.add(Sequence("huge", list(range(17)), SamplingParams(max_tokens=1)))
    sched.add(Sequence("ok", list(range(10)), SamplingParams(max_tokens=7)))  # 16 cached tokens: fits exactly
