"""The model and the engine on a CUDA GPU: the same logits and greedy tokens as on the CPU (fp32, TF32 off), MTP
speculative decoding, the compiled decode step, quantized weights, prefix caching, seeded sampling and structured
output there. Skipped where torch sees no GPU (CI, this project's CPU machines); run on a GPU machine with
`python -m pytest -q tests/test_cuda.py` (docs in README, "GPU"). The device errors at the end run everywhere."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen3next.checkpoint import load_model
from qwen3next.engine.llm import DEFAULT_MODEL, Engine, parse_device
from qwen3next.engine.sampling import SamplingParams
from qwen3next.tokenizer import Tokenizer
from tiny_models import make_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
demo = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="demo model not built")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
        "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on the GPU as on the CPU: no TF32 matrix products (they round inputs to 10 mantissa bits)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(DEFAULT_MODEL)


def prompts(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(TEXT)
    return [ids[:5], ids[:70], ids[:23], ids[:1], ids]


def greedy(engine: Engine, prompt_ids, max_tokens=24, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)
    reqs = [engine.add_request(p, params) for p in prompt_ids]
    while engine.step():
        pass
    return [r.output().token_ids for r in reqs]


def engine(device: str, **kw) -> Engine:
    kw = {"max_memory": "256MiB", "max_num_seqs": 4, "max_model_len": 512, "prefill_chunk_size": 32,
          "block_size": 16, "enable_prefix_caching": False, **kw}
    return Engine(DEFAULT_MODEL, device=device, **kw)


@cuda
@pytest.mark.parametrize("name", ["base", "mlp_only", "yarn"])
def test_forward_and_cached_decode_match_cpu(name):
    """One forward over a batch of two, then prefill + 6 single-token steps through the cache: GPU logits equal the
    CPU's to fp32 rounding (DeltaNet chunked and recurrent forms, attention with q/k norm and partial RoPE, MoE)."""
    cpu = make_model(name, seed=3)
    gpu = copy.deepcopy(cpu).to("cuda")
    ids = torch.randint(0, cpu.config.vocab_size, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = cpu(ids)
        got = gpu(ids.cuda()).cpu()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        outs = []
        for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
            cache = model.new_cache(1, 64)
            steps = [model(ids[:1, :30].to(dev), cache)[:, -1]]
            for t in range(30, 36):
                steps.append(model(ids[:1, t:t + 1].to(dev), cache)[:, -1])
            outs.append(torch.stack(steps).cpu())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@cuda
@demo
def test_engine_greedy_on_gpu_equals_cpu(tokenizer):
    """The demo model through the engine (five prompts of 1..~50 tokens batched, 32-token prefill chunks): the same
    greedy tokens on the GPU as on the CPU."""
    ps = prompts(tokenizer)
    want = greedy(engine("cpu"), ps)
    got = greedy(engine("cuda"), ps)
    assert got == want
    gpu = engine("cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"


@cuda
@demo
def test_bfloat16_on_gpu_close_to_fp32():
    """bf16 weights and activations on the GPU: next-token logits over the demo's text close to fp32 on the CPU and
    the same top-1 at nearly every position."""
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        ref = load_model(DEFAULT_MODEL, dtype=torch.float32)(ids)[0]
        bf = load_model(DEFAULT_MODEL, dtype=torch.bfloat16, device="cuda")(ids.cuda())[0].float().cpu()
    assert (bf.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (bf - ref).abs().max() < 0.1 * ref.abs().max()


@cuda
@demo
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_speculative_on_gpu_is_exact(tokenizer, k):
    """MTP drafting + verification on the GPU (k drafts, adaptive off; both as CUDA graphs): greedy output identical
    to plain decoding, and drafts are accepted (the demo's MTP head guesses most tokens)."""
    ps = prompts(tokenizer)
    want = greedy(engine("cuda"), ps, max_tokens=32)
    spec = engine("cuda", speculative_config={"method": "mtp", "num_speculative_tokens": k, "adaptive": False})
    got = greedy(spec, ps, max_tokens=32)
    assert got == want
    stats = spec.spec_stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0.5 * stats.num_draft_tokens
    graphs = spec.runner.graphs  # verifications and the drafting after them as CUDA graphs
    assert graphs.error is None and {"verify", "draft"} <= {kind for kind, _, _ in graphs.graphs}


@cuda
@demo
def test_compiled_decode_on_gpu_equals_eager(tokenizer):
    """compile_decode=True (torch.compile of the decode step; Triton kernels on the GPU) keeps the greedy tokens."""
    ps = prompts(tokenizer)[:3]
    want = greedy(engine("cuda", enforce_eager=True), ps)
    compiled = engine("cuda", compile_decode=True)
    got = greedy(compiled, ps)
    assert got == want
    graphs = compiled.runner.graphs  # the compiled step, captured in CUDA graphs
    assert graphs.error is None and graphs.replays > 0


@cuda
@demo
@pytest.mark.parametrize("quantize", ["int8", "int4", "bf16"])
def test_quantized_on_gpu_matches_cpu(quantize):
    """Quantized weights on the GPU compute what the reference twins compute on the CPU: the model quantized at load
    on the CPU and moved to the GPU (int4 leaves torch's CPU kernel layout for the canonical one) gives the same
    logits as the CPU with every bf16-activation kernel off (dequantize, then fp32 matmuls); quantizing while
    loading onto the GPU gives logits within the format's error of those and the same top-1."""
    from qwen3next import kernels
    from qwen3next.ops import dispatch

    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    ids = torch.tensor([tok.encode(TEXT)[:40]])
    saved = kernels.set_enabled(False), dispatch.set_fast_decode(False), dispatch.set_threshold("int8_kernel", 0)
    try:
        with torch.no_grad():
            quantized = load_model(DEFAULT_MODEL, dtype=torch.float32, quantize=quantize)
            gpu = copy.deepcopy(quantized).to("cuda")
            got = gpu(ids.cuda()).cpu()
            want = gpu.to("cpu")(ids)  # canonical layouts now, on the CPU: the reference arithmetic
            loaded = load_model(DEFAULT_MODEL, dtype=torch.float32, device="cuda", quantize=quantize)(ids.cuda()).cpu()
    finally:
        kernels.set_enabled(saved[0])
        dispatch.set_fast_decode(saved[1])
        dispatch.set_threshold("int8_kernel", saved[2])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (loaded - want).abs().max() < 0.05 * want.abs().max()
    assert (loaded.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


@cuda
@demo
def test_prefix_caching_on_gpu(tokenizer):
    """A repeated long prompt on the GPU reuses its cached prefix (KV blocks and a DeltaNet state snapshot) and gives
    the same tokens as without the cache."""
    ps = [tokenizer.encode(TEXT)]
    want = greedy(engine("cuda"), ps)
    cached = engine("cuda", enable_prefix_caching=True)
    first = greedy(cached, ps)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    req = cached.add_request(ps[0], params)
    while cached.step():
        pass
    assert first == want and req.output().token_ids == want[0]
    assert req.output().num_cached_tokens > 0


@cuda
@demo
def test_seeded_sampling_and_structured_output_on_gpu(tokenizer):
    """Seeded sampling on the GPU repeats itself (per-request generators on the device) and a regex-constrained
    request's text matches its pattern."""
    ps = prompts(tokenizer)[:2]
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=16, ignore_eos=True)
    runs = []
    for _ in range(2):
        e = engine("cuda")
        reqs = [e.add_request(p, params) for p in ps]
        while e.step():
            pass
        runs.append([r.output().token_ids for r in reqs])
    assert runs[0] == runs[1]
    e = engine("cuda")
    req = e.add_request(ps[0], SamplingParams(temperature=0.8, seed=1, max_tokens=20,
                                              structured_outputs={"regex": "(yes|no), [0-9]{2}"}))
    while e.step():
        pass
    import re

    assert re.fullmatch("(yes|no), [0-9]{2}", req.output().text)


@cuda
def test_cuda_graph_steps_equal_eager_steps():
    """The decode step captured in CUDA graphs and replayed (three sequences in scattered slots and blocks, one
    crossing the first key bucket, then one alone): the hidden states and every cache pool equal eager steps' on a
    copy of the cache; one graph per (batch size, key bucket), the other steps replays."""
    from test_cuda_graph import graph_steps_vs_eager

    from qwen3next.engine.cuda_graph import CUDAGraphDecoder

    worst, pools, decoder = graph_steps_vs_eager(CUDAGraphDecoder, "cuda")
    assert decoder.error is None
    assert worst < 1e-4 and pools < 1e-4
    assert decoder.captures == 3 and decoder.replays == 6


@cuda
@demo
@pytest.mark.parametrize("quantize", [None, "int8", "bf16", "int4"])
def test_engine_with_cuda_graphs_equals_eager_engine(tokenizer, quantize):
    """The engine's default on a GPU (decode steps as CUDA graphs) gives the greedy tokens of `enforce_eager`, with
    fp32, int8 and bf16-stored weights, for prompts joining and leaving the batch and one crossing the first key
    bucket; int4 experts keep eager steps and say why."""
    from qwen3next.engine.cuda_graph import MIN_KEYS

    ps = prompts(tokenizer) + [(tokenizer.encode(TEXT) * 8)[:MIN_KEYS - 8]]
    want = greedy(engine("cuda", enforce_eager=True, quantize=quantize), ps)
    graphed = engine("cuda", quantize=quantize)
    assert greedy(graphed, ps) == want
    graphs = graphed.runner.graphs
    if quantize == "int4":
        assert "int4 experts" in graphs.error and graphs.replays == 0
        return
    assert graphs.error is None and graphs.replays > 0
    assert any(w * 16 > MIN_KEYS for _, _, w in graphs.graphs)  # the long prompt's steps crossed the first bucket
    assert len({b for _, b, _ in graphs.graphs}) >= 2


def test_device_errors():
    """A device that cannot run gets a clear error naming it, before anything loads."""
    with pytest.raises(ValueError, match="device: expected"):
        parse_device("gpu")
    with pytest.raises(ValueError, match="device 'mps'"):
        parse_device("mps")
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(ValueError, match=f"device '{missing}'"):
        parse_device(missing)
    assert parse_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda'.*no CUDA"):
        Engine(DEFAULT_MODEL, device="cuda")
