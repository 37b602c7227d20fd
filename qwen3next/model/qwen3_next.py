"""Qwen3-Next: decoder layers, the model, the LM head and the MTP head.

Layers alternate DeltaNet and gated attention by `config.layer_types` (3 DeltaNet : 1 attention in the released
models); each is a pre-norm residual block with a sparse MoE (or dense MLP) after the mixer. The final norm's output
feeds the LM head and, for the MTP head, its extra decoder layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..config import Qwen3NextConfig
from ..ops.rope import rope_cos_sin, rope_inv_freq
from .attention import GatedAttention
from .batch import BatchInfo, ForwardContext
from .cache import HybridCache, SequenceCache, resolve_kv_cache_dtype
from .deltanet import GatedDeltaNet
from .layout import CacheLayout
from .linear import Linear
from .moe import MLP, SparseMoE
from .norm import RMSNorm

LOGPROB_ROWS = 256  # hidden rows per LM-head matmul in `token_logprobs`: [256, vocab] fp32 logits at a time


class TokenLogprobs(NamedTuple):
    """Of N positions: the target token's log-probability, its rank and the N most likely tokens."""

    logprobs: torch.Tensor  # [N] fp32
    ranks: torch.Tensor  # [N] long; 1 = the most likely token (tokens tied with the target count before it)
    top_logprobs: torch.Tensor  # [N, top_n] fp32, descending
    top_ids: torch.Tensor  # [N, top_n] long


class DecoderLayer(nn.Module):
    """Pre-norm residual block: token mixer (DeltaNet or gated attention), then MoE (or dense MLP)."""

    def __init__(self, config: Qwen3NextConfig, layer_type: str, is_moe: bool, cache_key: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, cache_key)
        else:
            self.self_attn = GatedAttention(config, cache_key)
        self.mlp = SparseMoE(config) if is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        h = h + mixer(self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h), ctx)


class Qwen3NextModel(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, t, config.is_moe_layer(i), str(i)) for i, t in enumerate(config.layer_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)


class MTPHead(nn.Module):
    """Multi-token prediction: from the main model's final (normed) hidden state at t and the embedding of
    token t+1, predict token t+2 through one extra full-attention + MoE decoder layer with its own KV cache."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        D = config.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(D, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(D, config.rms_norm_eps)
        self.fc = Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(config, "full_attention", True, f"mtp{i}")
                                    for i in range(config.num_nextn_predict_layers))
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, ctx: ForwardContext,
                layer: int = 0) -> torch.Tensor:
        """hidden, next_embeds: [N, D] -> draft hidden state [N, D] (normed; feed to lm_head for logits)."""
        return self.norm(self.layers[layer](self._layer_input(hidden, next_embeds), ctx))

    def _layer_input(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        c = torch.cat((self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)), dim=-1)
        return self.fc(c)

    def write_kv(self, hidden: torch.Tensor, next_embeds: torch.Tensor, ctx: ForwardContext, layer: int = 0) -> None:
        """What `forward` leaves in the cache, alone: the layer's keys and values at these positions (they depend on
        each position's own input only), without its attention, MoE and output (a fraction of the cost)."""
        decoder = self.layers[layer]
        decoder.self_attn.write_kv(decoder.input_layernorm(self._layer_input(hidden, next_embeds)), ctx)


class Qwen3NextForCausalLM(nn.Module):
    """The full model. Parameter names are the HF checkpoint names (`model.*`, `lm_head.*`, `mtp.*`)."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MTPHead(config) if config.num_nextn_predict_layers > 0 else None
        inv_freq, scale = rope_inv_freq(config.rope, config.rotary_dim, config.max_position_embeddings)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale

    def _apply(self, fn, recurse=True):
        # Keep the RoPE frequencies in fp32 whatever the model is cast to: bf16 angles lose whole radians at long
        # positions.
        super()._apply(fn, recurse)
        inv_freq, _ = rope_inv_freq(self.config.rope, self.config.rotary_dim, self.config.max_position_embeddings)
        self.rope_inv_freq = inv_freq.to(self.rope_inv_freq.device)
        return self

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", hf_overrides: dict | None = None) -> Qwen3NextForCausalLM:
        from ..checkpoint import load_model

        return load_model(path, dtype=dtype, device=device, hf_overrides=hf_overrides)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        from ..checkpoint import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init: N(0, initializer_range) for matrices, zero-centred norms 0, gated norm 1, dt_bias 1,
        A_log = log U(0.01, 16)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("A_log"):
                    p.copy_(torch.empty_like(p, dtype=torch.float32).uniform_(0.01, 16, generator=generator).log())
                elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype  # never quantized, unlike lm_head

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- caches -------------------------------------------------------------------------------------------------
    def cache_layout(self, include_mtp: bool = True) -> CacheLayout:
        """What this model's layers declare they keep per token (K/V) and per sequence (DeltaNet state)."""
        kv, state = {}, {}
        layers = [*self.model.layers, *(self.mtp.layers if include_mtp and self.mtp is not None else ())]
        for layer in layers:
            if layer.layer_type == "linear_attention":
                state[layer.linear_attn.cache_key] = layer.linear_attn.state_specs()
            else:
                kv[layer.self_attn.cache_key] = layer.self_attn.kv_spec()
        return CacheLayout(kv=kv, state=state)

    def new_cache(self, batch_size: int, max_len: int, block_size: int = 64,
                  kv_cache_dtype: str | torch.dtype | None = None) -> SequenceCache:
        """A cache for `batch_size` sequences of up to `max_len` tokens each; `kv_cache_dtype` as the engine's
        (`cache.resolve_kv_cache_dtype`: None / "auto" -> the activation dtype)."""
        return SequenceCache(self.config, batch_size, max_len, self.dtype, self.device, block_size,
                             layout=self.cache_layout(),
                             kv_dtype=resolve_kv_cache_dtype(kv_cache_dtype, self.dtype))

    def context(self, batch: BatchInfo, cache: HybridCache | None = None,
                router_logits: list[torch.Tensor] | None = None, views: bool = True) -> ForwardContext:
        """Prepare `batch` for this model (and `cache`); `views=False` reads the cache by index only."""
        if cache is None:
            batch.prepare(self.device)
        elif batch.slots is None or batch.block_tables is None:
            raise ValueError("batch: a forward with a cache needs slots and block_tables")
        else:
            batch.prepare(self.device, cache.block_size, cache.num_blocks, views=views)
        cos, sin = rope_cos_sin(batch.tokens.positions, self.rope_inv_freq, self.rope_scale, self.dtype)
        return ForwardContext(batch=batch, cos=cos, sin=sin, cache=cache, router_logits=router_logits)

    # ---- forward ------------------------------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Flat tokens [N] -> final normed hidden states [N, D]."""
        return self.model(self.model.embed_tokens(tokens), ctx)

    def forward(self, input_ids: torch.Tensor, cache: SequenceCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32 math in the head's dtype).

        `attention_mask` [B, T] (1 = real token, 0 = padding; left or right padding) lets rows have different
        lengths; logits at padded positions are zero. With `cache`, the tokens continue each cached sequence
        exactly (any number of tokens per call).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache: holds {cache.batch_size} sequences, input_ids has {B} rows")
        valid = attention_mask.bool() if attention_mask is not None else None
        lens = valid.sum(1).tolist() if valid is not None else [T] * B
        rows = [i for i in range(B) if lens[i] > 0]
        if not rows:
            return torch.zeros(B, T, self.config.vocab_size, dtype=self.dtype, device=input_ids.device)
        tokens = input_ids[valid] if valid is not None else input_ids.reshape(-1)
        seq_lens = [lens[i] for i in rows]
        if cache is not None:
            ctx = self.context(cache.batch(rows, seq_lens), cache.hybrid)
        else:
            ctx = self.context(BatchInfo(seq_lens))
        logits = self.lm_head(self.hidden_states(tokens, ctx))
        if cache is not None:
            cache.advance(rows, seq_lens)
        if valid is None:
            return logits.view(B, T, -1)
        out = logits.new_zeros(B, T, logits.shape[-1])
        out[valid] = logits
        return out

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, top_n: int = 0) -> TokenLogprobs:
        """Log-softmax of the LM head at hidden states [N, D], kept only at `targets` [N] (with their ranks) and the
        top `top_n`; the head runs LOGPROB_ROWS rows at a time, so [N, vocab] logits never exist at once."""
        rows = LOGPROB_ROWS  # read per call (tests shrink it to split small inputs)
        chosen, ranks, top_lp, top_ids = [], [], [], []
        for a in range(0, hidden.shape[0], rows):
            lp = torch.log_softmax(self.lm_head(hidden[a:a + rows]).float(), dim=-1)  # [R, vocab]
            c = lp.gather(1, targets[a:a + rows, None])  # [R, 1]
            chosen.append(c[:, 0])
            ranks.append((lp >= c).sum(dim=-1))
            v, i = lp.topk(top_n, dim=-1)  # [R, top_n]
            top_lp.append(v)
            top_ids.append(i)
        if not chosen:
            empty = hidden.new_empty(0, dtype=torch.float32)
            return TokenLogprobs(empty, empty.long(), empty.view(0, top_n), empty.view(0, top_n).long())
        return TokenLogprobs(torch.cat(chosen), torch.cat(ranks), torch.cat(top_lp), torch.cat(top_ids))

    def mtp_hidden(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: ForwardContext,
                   layer: int = 0) -> torch.Tensor:
        """MTP draft hidden states [N, D] from main hidden states [N, D] at t and tokens t+1 [N]."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (num_nextn_predict_layers = 0)")
        return self.mtp(hidden, self.model.embed_tokens(next_tokens), ctx, layer)

    def mtp_write_kv(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: ForwardContext,
                     layer: int = 0) -> None:
        """The MTP layer's K/V at these positions (what `mtp_hidden` writes into the cache), nothing else."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (num_nextn_predict_layers = 0)")
        self.mtp.write_kv(hidden, self.model.embed_tokens(next_tokens), ctx, layer)
