"""Qwen3-Next: decoder layers, the model, the LM head and the MTP head, wired as SPEC §2 and §9 describe."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Qwen3NextConfig
from ..fastpath import CompileDecodeError, fast_decode
from ..ops.rope import rope_cos_sin, rope_inv_freq
from .attention import GatedAttention
from .cache import BatchInfo, ForwardContext, HybridCache, SequenceCache
from .deltanet import GatedDeltaNet
from .linear import Linear
from .moe import MLP, SparseMoE
from .norm import RMSNorm


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
    """Multi-token prediction (SPEC §9): from the main model's final (normed) hidden state at t and the embedding of
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
        c = torch.cat((self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)), dim=-1)
        c = self.layers[layer](self.fc(c), ctx)
        return self.norm(c)


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
        self._compiled_decoder = None  # see compile_decode()

    def _apply(self, fn, recurse=True):
        # Keep the RoPE frequencies in fp32 whatever the model is cast to (SPEC §11: angles in fp32).
        super()._apply(fn, recurse)
        inv_freq, _ = rope_inv_freq(self.config.rope, self.config.rotary_dim, self.config.max_position_embeddings)
        self.rope_inv_freq = inv_freq.to(self.rope_inv_freq.device)
        return self

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> Qwen3NextForCausalLM:
        from ..checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        from ..checkpoint import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as SPEC §7: N(0, initializer_range) for matrices, zero-centred norms 0, gated norm 1."""
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
    def new_cache(self, batch_size: int, max_len: int, block_size: int = 64) -> SequenceCache:
        return SequenceCache(self.config, batch_size, max_len, self.dtype, self.device, block_size)

    def context(self, batch: BatchInfo, cache: HybridCache | None = None,
                router_logits: list[torch.Tensor] | None = None) -> ForwardContext:
        if cache is None:
            batch.prepare(self.device)
        else:
            compiled = self._uses_compiled_decoder(cache, all(n == 1 for n in batch.seq_lens))
            batch.prepare(self.device, cache.block_size, cache.num_blocks, views=not compiled)
        cos, sin = rope_cos_sin(batch.positions, self.rope_inv_freq, self.rope_scale, self.dtype)
        return ForwardContext(batch=batch, cos=cos, sin=sin, cache=cache, router_logits=router_logits)

    # ---- forward ------------------------------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Flat tokens [N] -> final normed hidden states [N, D]."""
        h = self.model.embed_tokens(tokens)
        if self._uses_compiled_decoder(ctx.cache, ctx.batch.is_decode):
            return self._compiled_decoder(h, ctx)
        return self.model(h, ctx)

    # ---- compiled decode ----------------------------------------------------------------------------------------
    def compile_decode(self, enabled: bool = True) -> None:
        """Run decode steps (one new token per sequence, with a cache, no autograd) through a `torch.compile`d
        decoder stack; prefill and everything else stay eager. Off by default: compiling takes a while (~20-60 s
        per graph on 2 cores; a graph for batch 1, one more once the context length varies, one once the batch size
        does) and needs a C++ compiler. Measured on an AVX2 EPYC, 2 threads: `small` decode steps 1.7x (batch 1)
        and 1.9x (batch 8) faster than the eager fast paths; `tiny` ~1.3 ms vs ~4.2 ms per step.

        The compiled graph reads the cache through index tensors only (`BatchInfo.prepare(views=False)`), so slot
        and block layouts do not multiply the graphs. Call `warm_up_decode(cache)` to compile before serving."""
        if enabled:
            import torch._dynamo.config

            # Graphs are cached per code object, shared by every model in the process (a float model and its
            # quantized copy, several batch sizes...); past the default limit of 8, dynamo silently runs eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_decoder = torch.compile(self.model.forward) if enabled else None

    @torch.no_grad()
    def warm_up_decode(self, cache: HybridCache) -> None:
        """Compile the decode graphs now, on `cache` (the one that will be used: its pool sizes are part of the
        graph): batch 1 at two context lengths, then batches 2 and 3 (a size that changes from 1 stays specialised,
        so it takes a second change before the batch size becomes dynamic), then 9 if the cache has room (the CPU
        attention kernel adds a guard at 8). Uses the first slots and blocks and zeroes those slots' DeltaNet state
        afterwards. Raises CompileDecodeError naming the cause if torch.compile fails."""
        if self._compiled_decoder is None:
            raise ValueError("warm_up_decode: call compile_decode() first")
        if cache.num_slots < 2 or cache.num_blocks < 2 or cache.block_size < 4:
            raise ValueError("warm_up_decode: the cache needs at least 2 slots and 2 blocks of >= 4 tokens")
        room = min(cache.num_slots, cache.num_blocks)
        plan = [(1, 1), (1, 2)] + [(b, b) for b in (2, 3, 9) if b <= room]
        largest = plan[-1][0]
        try:
            for batch_size, context in plan:
                batch = BatchInfo([1] * batch_size, [context] * batch_size, list(range(batch_size)),
                                  [[i] for i in range(batch_size)])
                tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
                self.hidden_states(tokens, self.context(batch, cache))
        except Exception as e:  # inductor raises many types; any of them means "compiled decode unavailable here"
            self._compiled_decoder = None
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise CompileDecodeError(f"compile_decode: torch.compile failed on this machine ({type(e).__name__}: "
                                     f"{first}); decoding stays eager") from e
        finally:
            cache.reset_slots(list(range(largest)))

    @property
    def compiled_decode(self) -> bool:
        return self._compiled_decoder is not None

    def _uses_compiled_decoder(self, cache: HybridCache | None, is_decode: bool) -> bool:
        return self._compiled_decoder is not None and cache is not None and is_decode and fast_decode()

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
            for i in rows:
                if cache.lengths[i] + lens[i] > cache.max_len:
                    raise ValueError(f"cache: sequence {i} would hold {cache.lengths[i] + lens[i]} tokens, "
                                     f"more than its max_len {cache.max_len}")
            batch = BatchInfo(seq_lens, [cache.lengths[i] for i in rows], rows, [cache.block_tables[i] for i in rows])
            ctx = self.context(batch, cache.cache)
        else:
            ctx = self.context(BatchInfo(seq_lens))
        logits = self.lm_head(self.hidden_states(tokens, ctx))
        if cache is not None:
            for i in rows:
                cache.lengths[i] += lens[i]
        if valid is None:
            return logits.view(B, T, -1)
        out = logits.new_zeros(B, T, logits.shape[-1])
        out[valid] = logits
        return out

    def mtp_hidden(self, hidden: torch.Tensor, next_tokens: torch.Tensor, ctx: ForwardContext,
                   layer: int = 0) -> torch.Tensor:
        """MTP draft hidden states [N, D] from main hidden states [N, D] at t and tokens t+1 [N]."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (num_nextn_predict_layers = 0)")
        return self.mtp(hidden, self.model.embed_tokens(next_tokens), ctx, layer)
