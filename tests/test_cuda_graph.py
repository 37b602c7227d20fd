"""The CUDA-graph decode step (engine/cuda_graph.py) on the CPU: what can be checked without a GPU.

A graph replays the kernels of one run of the step program over static input tensors. Here torch's graph capture is
replaced by re-running that same program over the same static tensors (`ReplayDecoder`), so that everything of ours
runs as it does on a GPU: the choice of graph per (batch size, key bucket), the refilling of the static inputs
(context lengths, slots, padded block tables) at every step, the program itself (positions, K/V rows and RoPE derived
from tensors, attention over per-query rows) and its place in the engine. tests/test_cuda.py runs the real capture
on a GPU against eager steps and the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_aot_step import _cache, _pools

from qwen3next import kernels
from qwen3next.engine.cuda_graph import MIN_KEYS, CUDAGraphDecoder, graph_blocker
from qwen3next.engine.llm import Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.model.attention import attention_over_rows
from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache
from qwen3next.ops.dispatch import sync_free, sync_free_scope
from qwen3next.quant import quantize_model
from qwen3next.tokenizer import Tokenizer
from tiny_models import make_model, write_byte_tokenizer


class _Rerun:
    """Stands in for a recorded CUDA graph on the CPU: replay() runs the program again over the static inputs."""

    def __init__(self, g):
        self.g = g

    def replay(self) -> None:
        with sync_free_scope():
            for dst, src in zip(self.g.outs, self.g.run()):
                dst.copy_(src)


class ReplayDecoder(CUDAGraphDecoder):
    def _capture(self, g, key):
        with sync_free_scope():
            result = tuple(o.clone() for o in g.run())
        g.graph, g.outs = _Rerun(g), tuple(torch.empty_like(r) for r in result)
        self.graphs[key] = g
        self.captures += 1
        return result


def graph_steps_vs_eager(decoder_cls, device: str) -> tuple[float, float, CUDAGraphDecoder]:
    """Three sequences in scattered slots and blocks, one of them crossing the first key bucket (MIN_KEYS keys) while
    decoding, then one sequence alone, through `decoder_cls` on one cache and eagerly on a copy -> (largest |Δ| of
    the hidden states, largest |Δ| over every cache pool, the decoder). Shared with tests/test_cuda.py."""
    model = make_model("base", vocab_size=261).to(device)
    bs = 16

    def new_cache():
        return HybridCache(model.config, num_slots=6, num_blocks=40, block_size=bs, device=device,
                           layout=model.cache_layout(include_mtp=False))

    cache, eager = new_cache(), new_cache()
    gen = torch.Generator().manual_seed(0)
    lens, slots = [MIN_KEYS - 3, 30, 2], [4, 1, 3]
    tables = [list(range(20, 37)), [0, 5, 9], [11]]  # room for MIN_KEYS + 3 tokens; the others within their blocks

    def tokens(n):
        return torch.randint(0, model.config.vocab_size, (n,), generator=gen).to(device)

    with torch.no_grad():
        model.hidden_states(tokens(sum(lens)), model.context(BatchInfo(lens, [0] * 3, slots, tables), cache))
        for a, b in zip(_pools(eager), _pools(cache)):
            a.copy_(b)
        decoder = decoder_cls(model, cache, max_batch=4, max_len=1024)
        worst = 0.0
        steps = [(list(range(3)), t) for t in range(6)] + [([1], 6 + t) for t in range(3)]  # then sequence 1 alone
        for rows, t in steps:
            ids = tokens(len(rows))

            def batch(rows=rows, t=t):
                return BatchInfo([1] * len(rows), [lens[r] + t for r in rows], [slots[r] for r in rows],
                                 [tables[r] for r in rows])

            assert decoder.handles(batch())
            got, logits, argmax = decoder.decode(ids, batch(), cache)
            want = model.hidden_states(ids, model.context(batch(), eager))
            assert torch.equal(argmax, logits.argmax(-1))
            worst = max(worst, (got - want).abs().max().item(), (logits - model.lm_head(want)).abs().max().item())
    pools = max((a - b).abs().max().item() for a, b in zip(_pools(cache), _pools(eager)))
    return worst, pools, decoder


def test_graph_steps_match_eager_steps_across_key_buckets_and_batch_sizes():
    """Hidden states, their logits and every cache pool equal the eager steps'; one graph per (batch size, key
    bucket), every later step a replay."""
    worst, pools, decoder = graph_steps_vs_eager(ReplayDecoder, "cpu")
    assert worst < 1e-5 and pools < 1e-5
    w0 = MIN_KEYS // 16
    # the first sequence crossed MIN_KEYS keys
    assert sorted(decoder.graphs) == [("step", 1, w0), ("step", 3, w0), ("step", 3, 2 * w0)]
    assert decoder.captures == 3 and decoder.replays == 9 - 3


def test_graph_width_buckets_and_limits():
    """W is the block-table width rounded up to a power of two from MIN_KEYS keys, capped by the model length;
    longer contexts, larger batches, steps with several tokens, captured states or snapshots stay eager."""
    model = make_model("base", vocab_size=261)
    cache = _cache(model, num_slots=4, num_blocks=8, block_size=16)
    decoder = ReplayDecoder(model, cache, max_batch=2, max_len=700)
    w0 = MIN_KEYS // 16

    def width(context):
        return decoder.width(context + 1)

    assert width(0) == w0 and width(MIN_KEYS - 1) == w0 and width(MIN_KEYS) == 2 * w0
    assert width(699) == 44 and width(703) == 44 and width(704) is None  # 44 blocks of 16 hold 700 keys: not 64
    with torch.no_grad():  # the engine's steps run without autograd (fast_decode())
        assert decoder.handles(BatchInfo([1, 1], [5, 9], [0, 1], [[0], [1]]))
        assert not decoder.handles(BatchInfo([1] * 3, [5] * 3, [0, 1, 2], [[0], [1], [2]]))
        assert not decoder.handles(BatchInfo([2], [5], [0], [[0]]))
        assert not decoder.handles(BatchInfo([1], [5], [0], [[0]], capture_states=True))
        assert not decoder.handles(BatchInfo([1], [704], [0], [[0] * 45]))


def _engine(model, tokenizer, **kw) -> Engine:
    return Engine(model, tokenizer=tokenizer, max_memory="64MiB", max_num_seqs=4, max_model_len=400,
                  prefill_chunk_size=48, block_size=16, enable_prefix_caching=False, **kw)


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_with_graph_steps_equals_eager_engine(tmp_path, speculative):
    """The engine with its decode steps through the graph decoder: the same greedy tokens as the plain engine for
    prompts of several lengths (one past MIN_KEYS) whose requests end at different steps (the batch size changes),
    the steps in multi-step runs of graph replays; with MTP drafting (k = 2), the verifications and the drafting
    after them through their graphs too."""
    write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    model = make_model("base", vocab_size=261)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (MIN_KEYS + 4, 7, 40, 1)]
    spec = {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False} if speculative else None
    outputs, decoders, runs = [], [], []
    for graphs in (False, True):
        engine = _engine(model, tok, speculative_config=spec)
        runner = engine.runner
        if graphs:
            runner.graphs = ReplayDecoder(model, runner.cache, max_batch=4, max_len=400,
                                          verify_tokens=3 if speculative else 0, draft_head=runner.draft_head,
                                          draft_mtp=runner.draft_mtp)
            decoders.append(runner.graphs)
            engine.scheduler.config.multi_step_seconds = 60.0  # multi-step runs of graph replays, whatever the speed
            execute = runner.execute
            runner.execute = lambda batch, _execute=execute: runs.append(batch.num_steps) or _execute(batch)
        reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
                for p, m in zip(prompts, (12, 20, 6, 16))]
        while engine.step():
            pass
        outputs.append([r.output().token_ids for r in reqs])
        if speculative:
            outputs[-1].append(engine.spec_stats.num_accepted_tokens)
    assert outputs[1] == outputs[0]
    assert speculative or max(runs) > 1  # (with MTP the draft length stays 2: no step without drafts)
    decoder = decoders[0]
    assert decoder.replays > 0
    kinds = {k for k, _, _ in decoder.graphs}
    assert kinds >= {"verify", "draft"} if speculative else kinds == {"step"}
    assert len({b for _, b, _ in decoder.graphs}) >= 2  # requests ended at different steps


def test_attention_over_rows_matches_the_reference():
    """The device form of the per-query decode attention (SDPA over gathered rows with a key mask) equals the fp64
    reference: grouped heads, rows scattered over the pool, different key counts per query (one of them 1)."""
    gen = torch.Generator().manual_seed(0)
    N, H, HKV, Dh, L, P = 5, 6, 2, 32, 23, 64
    q = torch.randn(N, H, Dh, generator=gen)
    k_pool, v_pool = torch.randn(P, HKV, Dh, generator=gen), torch.randn(P, HKV, Dh, generator=gen)
    rows = torch.stack([torch.randperm(P, generator=gen)[:L] for _ in range(N)])
    lens = torch.tensor([L, 1, 7, 16, 22])
    got = attention_over_rows(q, k_pool, v_pool, rows, lens, Dh ** -0.5)
    want = kernels.decode_attention_reference(q, k_pool, v_pool, rows, lens, Dh ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, attention_over_rows(q, k_pool, v_pool, rows, lens - (lens > 1).long(),
                                                       Dh ** -0.5))  # the mask matters


def test_sync_free_scope_picks_the_gathered_experts():
    """Inside sync_free_scope the MoE takes the gathered form for any number of pairs (no host sync); the result
    equals the grouped form's."""
    from qwen3next.ops.moe import experts_grouped, experts_reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 16, generator=gen)
    ids = torch.randint(0, 6, (9, 3), generator=gen)
    weights = F.softmax(torch.randn(9, 3, generator=gen), -1)
    gate_up, down = torch.randn(6, 20, 16, generator=gen), torch.randn(6, 16, 10, generator=gen)
    assert not sync_free(x)
    was = kernels.set_enabled(False)  # else the native MoE kernel takes these few tokens first
    try:
        with torch.no_grad(), sync_free_scope():
            assert sync_free(x)
            got = experts_grouped(x, weights, ids, gate_up, down)
    finally:
        kernels.set_enabled(was)
    assert not sync_free(x)
    torch.testing.assert_close(got, experts_reference(x, weights, ids, gate_up, down), rtol=1e-5, atol=1e-5)


def test_graph_blocker_names_int4_experts():
    """int4 experts group tokens on the host: that model's steps stay eager, and the reason says why; fp32 and int8
    models can be captured."""
    assert graph_blocker(make_model("base")) is None
    assert graph_blocker(quantize_model(make_model("base"), 8)) is None
    reason = graph_blocker(quantize_model(make_model("base"), 4, group_size=8))  # divides the experts' sizes
    assert reason is not None and "int4 experts" in reason


def test_enforce_eager_is_accepted_everywhere(tmp_path):
    """`enforce_eager` (vLLM's name) is an Engine option and a CLI flag of generate / chat / serve; on a CPU there
    are no graphs either way."""
    from qwen3next.cli import build_parser

    write_byte_tokenizer(tmp_path)
    engine = _engine(make_model("base", vocab_size=261), Tokenizer.from_dir(tmp_path), enforce_eager=True)
    assert engine.runner.graphs is None
    assert build_parser().parse_args(["generate", "--enforce-eager", "--prompt", "x"]).enforce_eager
    assert build_parser("serve").parse_args(["serve", "--model", str(tmp_path), "--enforce-eager"]).enforce_eager
