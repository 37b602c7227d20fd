"""Make a model hold one rank's part of every layer (parallel/plan.py), and connect the parts.

The model files stay as they are: sharding slices the parameters of the existing modules (on the meta device for a
sharded load, or of a loaded model) and sets their local head counts, which is all their forward and their cache
declarations read. What crosses ranks is added around whole sublayers:
- the output of every attention, DeltaNet, MoE and dense-MLP sublayer is a partial sum over ranks (row-parallel
  output projections; the routed experts' and the shared expert's shares together): ONE all-reduce per sublayer,
  by a forward hook on the sublayer's module;
- the embedding looks up its vocabulary rows and all-reduces (`VocabParallelEmbedding`);
- the LM head computes its vocabulary rows and all-gathers the logits, so every rank sees [N, vocab].
Parameters keep their names (a sharded model's `named_parameters()` are the full model's, each with the local
slice), so loading, quantizing and saving code works unchanged per rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import GatedAttention
from ..model.deltanet import GatedDeltaNet
from ..model.linear import Linear
from ..model.moe import MLP, Experts, SparseMoE
from ..model.qwen3_next import DecoderLayer, Qwen3NextForCausalLM
from .comm import TPComm
from .plan import TPPlan, split_range


def _rows(t: torch.Tensor, ranges: list[tuple[int, int]], dim: int = 0) -> torch.Tensor:
    """The concatenation of index ranges of `t` along `dim` (a copy)."""
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim).clone()


def _linear(weight: torch.Tensor) -> Linear:
    with torch.device(weight.device):
        lin = Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _sliced(lin: nn.Linear, rows: list[tuple[int, int]] | None = None,
            cols: list[tuple[int, int]] | None = None) -> Linear:
    if lin.bias is not None:
        raise ValueError("tensor parallelism: biased projections are not supported (Qwen3-Next has none)")
    w = lin.weight.detach()
    if rows is not None:
        w = _rows(w, rows, 0)
    if cols is not None:
        w = _rows(w, cols, 1)
    lin = _linear(w)
    lin.tp_partial_rows = cols is not None  # row-parallel: each row of the weight is only part of the full row
    return lin


def shard_attention(a: GatedAttention, plan: TPPlan) -> None:
    s = plan.attention()
    (q0, q1), (k0, k1), Dh = s.q_heads, s.kv_heads, a.head_dim
    a.q_proj = _sliced(a.q_proj, rows=[(q0 * 2 * Dh, q1 * 2 * Dh)])  # per head [query | gate]
    a.k_proj = _sliced(a.k_proj, rows=[(k0 * Dh, k1 * Dh)])
    a.v_proj = _sliced(a.v_proj, rows=[(k0 * Dh, k1 * Dh)])
    a.o_proj = _sliced(a.o_proj, cols=[(q0 * Dh, q1 * Dh)])
    a.num_heads, a.num_kv_heads = q1 - q0, k1 - k0


def deltanet_ranges(m: GatedDeltaNet, h0: int, h1: int) -> dict[str, list[tuple[int, int]]]:
    """The rows of each DeltaNet parameter that key heads [h0, h1) own (in the model's grouped-by-kind layout:
    in_proj_qkvz = [q | k | v | z], in_proj_ba = [b | a], conv channels = [q | k | v])."""
    K, V, r = m.head_k_dim, m.head_v_dim, m.num_v_heads // m.num_k_heads
    key, value = m.key_dim, m.value_dim
    q, k = (h0 * K, h1 * K), (key + h0 * K, key + h1 * K)
    v = (2 * key + h0 * r * V, 2 * key + h1 * r * V)
    z = (2 * key + value + h0 * r * V, 2 * key + value + h1 * r * V)
    heads = (h0 * r, h1 * r)
    return {"qkvz": [q, k, v, z], "conv": [q, k, v], "ba": [heads, (m.num_v_heads + h0 * r, m.num_v_heads + h1 * r)],
            "heads": [heads], "out": [(h0 * r * V, h1 * r * V)]}


def shard_deltanet(m: GatedDeltaNet, plan: TPPlan) -> None:
    h0, h1 = plan.deltanet_key_heads()
    ranges = deltanet_ranges(m, h0, h1)
    m.in_proj_qkvz = _sliced(m.in_proj_qkvz, rows=ranges["qkvz"])
    m.in_proj_ba = _sliced(m.in_proj_ba, rows=ranges["ba"])
    conv_w = _rows(m.conv1d.weight.detach(), ranges["conv"])
    C, W = conv_w.shape[0], m.kernel_size
    with torch.device(conv_w.device):
        m.conv1d = nn.Conv1d(C, C, W, groups=C, bias=False, padding=W - 1, dtype=conv_w.dtype)
    m.conv1d.weight = nn.Parameter(conv_w, requires_grad=False)
    m.dt_bias = nn.Parameter(_rows(m.dt_bias.detach(), ranges["heads"]), requires_grad=False)
    m.A_log = nn.Parameter(_rows(m.A_log.detach(), ranges["heads"]), requires_grad=False)
    m.out_proj = _sliced(m.out_proj, cols=ranges["out"])
    r = m.num_v_heads // m.num_k_heads
    m.num_k_heads, m.num_v_heads = h1 - h0, (h1 - h0) * r
    m.key_dim, m.value_dim = m.num_k_heads * m.head_k_dim, m.num_v_heads * m.head_v_dim
    m.conv_dim = 2 * m.key_dim + m.value_dim


def shard_mlp(mlp: MLP, plan: TPPlan) -> None:
    c0, c1 = plan.channels(mlp.gate_proj.weight.shape[0])
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=[(c0, c1)])
    mlp.up_proj = _sliced(mlp.up_proj, rows=[(c0, c1)])
    mlp.down_proj = _sliced(mlp.down_proj, cols=[(c0, c1)])


def shard_moe(moe: SparseMoE, plan: TPPlan) -> None:
    """The rank's experts [e0, e1) (kept as they are when the loader already built only those: `local_experts`
    set) and its channels of the shared expert."""
    if moe.local_experts is None:
        e0, e1 = plan.experts()
        gate_up, down = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
        with torch.device(gate_up.device):
            experts = Experts(e1 - e0, down.shape[1], down.shape[2])
        experts.gate_up_proj = nn.Parameter(gate_up[e0:e1].clone(), requires_grad=False)
        experts.down_proj = nn.Parameter(down[e0:e1].clone(), requires_grad=False)
        moe.experts, moe.local_experts = experts, (e0, e1)
    elif moe.local_experts != plan.experts():
        raise ValueError(f"experts {moe.local_experts} are not rank {plan.rank}'s {plan.experts()}")
    if moe.has_shared:
        shard_mlp(moe.shared_expert, plan)


def keep_local_experts(moe: SparseMoE, plan: TPPlan) -> None:
    """Before loading (on the meta device): the layer's experts become only the rank's, so the loader allocates and
    reads just those (the routed experts are ~97% of the 80B's bytes); `shard_moe` then keeps them."""
    e0, e1 = plan.experts()
    down = moe.experts.down_proj
    with torch.device(down.device):
        moe.experts = Experts(e1 - e0, down.shape[1], down.shape[2]).to(down.dtype)
    moe.local_experts = (e0, e1)


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows [start, stop) of an embedding; a lookup is summed over ranks (rows elsewhere give 0)."""

    def __init__(self, weight: torch.Tensor, start: int, comm: TPComm | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, max(self.weight.shape[0] - 1, 0)), self.weight) * mine.unsqueeze(-1)
        return self.comm.all_reduce(out) if self.comm is not None else out


def _reduce_output(comm: TPComm):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(output)
    return hook


def gather_logits(model: Qwen3NextForCausalLM, comm: TPComm, sizes: list[int]) -> None:
    """All-gather the LM head's vocabulary shards into full logits (again after a module swap of lm_head, e.g. by
    quantization; once per module)."""
    head = model.lm_head
    if getattr(head, "_tp_gather", False):
        return

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return comm.all_gather_last(output, sizes)

    head.register_forward_hook(hook)
    head._tp_gather = True


def shard_layer(layer: DecoderLayer, plan: TPPlan, comm: TPComm | None = None) -> None:
    """One decoder layer's share: its mixer's heads and its MoE's experts (or MLP's channels), in place; with
    `comm`, each sublayer's output all-reduced."""
    mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
    (shard_deltanet if layer.layer_type == "linear_attention" else shard_attention)(mixer, plan)
    if isinstance(layer.mlp, SparseMoE):
        shard_moe(layer.mlp, plan)
    else:
        shard_mlp(layer.mlp, plan)
    if comm is not None:
        hook = _reduce_output(comm)
        mixer.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def shard_embedding(model: Qwen3NextForCausalLM, plan: TPPlan, comm: TPComm | None = None) -> None:
    v0, v1 = plan.vocab()
    embed = model.model.embed_tokens.weight.detach()
    if embed.shape[0] != v1 - v0:  # the whole table (the loader may have read only the rank's rows)
        embed = embed[v0:v1].clone()
    model.model.embed_tokens = VocabParallelEmbedding(embed, v0, comm)


def shard_lm_head(model: Qwen3NextForCausalLM, plan: TPPlan, comm: TPComm | None = None) -> None:
    """The head's vocabulary rows (the embedding's, when tied: shard the embedding first); with `comm`, the logits
    all-gathered."""
    config = model.config
    v0, v1 = plan.vocab()
    if config.tie_word_embeddings:
        model.lm_head = _linear(model.model.embed_tokens.weight.detach())
        model.lm_head.weight = model.model.embed_tokens.weight
    elif model.lm_head.weight.shape[0] != v1 - v0:  # the whole head (the loader may have read only the rank's rows)
        model.lm_head = _sliced(model.lm_head, rows=[(v0, v1)])
    if comm is not None:
        gather_logits(model, comm, [b - a for a, b in (split_range(config.vocab_size, plan.world, r)
                                                        for r in range(plan.world))])


def shard_model(model: Qwen3NextForCausalLM, plan: TPPlan, comm: TPComm | None = None) -> Qwen3NextForCausalLM:
    """Turn `model` (full, on any device, meta included) into rank `plan.rank`'s shard, in place. With `comm` the
    shard is connected (all-reduces, the logits' all-gather); without, it only has the local shapes (planning).
    (checkpoint.load_model(shard=...) does the same part by part while loading.)"""
    for layer in [*model.model.layers, *(model.mtp.layers if model.mtp is not None else ())]:
        shard_layer(layer, plan, comm)
    shard_embedding(model, plan, comm)
    shard_lm_head(model, plan, comm)
    model.tp_plan = plan
    return model
