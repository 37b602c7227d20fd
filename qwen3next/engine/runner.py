"""The one place the engine touches tensors: owns the model and the hybrid cache, runs a scheduled batch."""

from __future__ import annotations

import torch

from ..model.cache import BatchInfo, HybridCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from .block_manager import CacheGeometry, CachePlan
from .sampler import SampleOutput, sample
from .scheduler import ScheduledBatch


def cache_geometry(model: Qwen3NextForCausalLM, block_size: int) -> CacheGeometry:
    """Bytes per KV token and per DeltaNet state slot, as `HybridCache` will allocate them."""
    c = model.config
    elem = torch.empty((), dtype=model.dtype).element_size()
    return CacheGeometry(kv_bytes_per_token=c.kv_bytes_per_token(elem),
                         state_bytes_per_slot=c.state_bytes_per_sequence(elem, 4), block_size=block_size)


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, plan: CachePlan):
        self.model = model
        self.cache = HybridCache(model.config, num_slots=plan.num_slots, num_blocks=plan.num_blocks,
                                 block_size=plan.block_size, dtype=model.dtype, device=model.device,
                                 include_mtp=False)

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch) -> SampleOutput | None:
        """One forward over the scheduled tokens; samples a token for every entry that needs one."""
        model = self.model
        self.cache.reset_slots(batch.fresh_slots)
        info = BatchInfo(batch.num_new_tokens, batch.context_lens, batch.slots, batch.block_tables)
        ctx = model.context(info, self.cache)
        tokens = torch.tensor(batch.input_ids, dtype=torch.long, device=model.device)
        hidden = model.hidden_states(tokens, ctx)
        if not batch.logits_indices:
            return None
        idx = torch.tensor(batch.logits_indices, dtype=torch.long, device=model.device)
        logits = model.lm_head(hidden.index_select(0, idx)).float()
        seqs = batch.sampled_seqs
        generators = []
        for s in seqs:
            seed = s.sampling_seed()
            generators.append(None if seed is None else torch.Generator(device=logits.device).manual_seed(seed))
        needs_history = any(s.params.has_penalties for s in seqs)
        return sample(logits, [s.params for s in seqs], generators,
                      [s.prompt_token_ids for s in seqs] if needs_history else None,
                      [s.output_token_ids for s in seqs] if needs_history else None)
