"""The one place the engine touches tensors: owns the model, the hybrid cache and the compiled decoder, and runs
a scheduled batch: slot operations, one forward, one sampling batch."""

from __future__ import annotations

import torch

from ..model.batch import BatchInfo
from ..model.cache import HybridCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from .memory import CacheGeometry, CachePlan
from .sampler import SampleOutput, SamplingBatch, sample
from .scheduler import ScheduledBatch


def cache_geometry(model: Qwen3NextForCausalLM, block_size: int) -> CacheGeometry:
    """Bytes per KV token and per DeltaNet state slot, as `HybridCache` will allocate them for this model."""
    layout = model.cache_layout(include_mtp=False)
    elem = torch.empty((), dtype=model.dtype).element_size()
    return CacheGeometry(kv_bytes_per_token=layout.kv_bytes_per_token(elem),
                         state_bytes_per_slot=layout.state_bytes_per_slot(elem, 4), block_size=block_size)


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, plan: CachePlan, compile_decode: bool = False):
        """`compile_decode`: run decode steps through a torch.compile'd decoder (see engine/compiled.py), compiled
        here on this cache before any request (raises CompileDecodeError when this machine cannot compile)."""
        self.model = model
        self.cache = HybridCache(model.config, num_slots=plan.num_slots, num_blocks=plan.num_blocks,
                                 block_size=plan.block_size, dtype=model.dtype, device=model.device,
                                 layout=model.cache_layout(include_mtp=False))
        self.compiled = None
        if compile_decode:
            from .compiled import CompiledDecoder

            compiled = CompiledDecoder(model)
            compiled.warm_up(self.cache)
            self.compiled = compiled

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch) -> SampleOutput | None:
        """One forward over the scheduled tokens; samples a token for every entry that needs one."""
        model = self.model
        for op in batch.slot_ops:
            op.apply(self.cache)
        info = BatchInfo(batch.num_new_tokens, batch.context_lens, batch.slots, batch.block_tables,
                         positions=batch.positions, kv_write_rows=batch.kv_write_indices)
        tokens = torch.tensor(batch.input_ids, dtype=torch.long, device=model.device)
        if self.compiled is not None and self.compiled.handles(info):
            hidden = self.compiled.hidden_states(tokens, info, self.cache)
        else:
            hidden = model.hidden_states(tokens, model.context(info, self.cache))
        if not batch.logits_indices:
            return None
        idx = torch.tensor(batch.logits_indices, dtype=torch.long, device=model.device)
        logits = model.lm_head(hidden.index_select(0, idx)).float()
        return sample(logits, SamplingBatch.for_sequences(batch.sampled_seqs, logits.device))
