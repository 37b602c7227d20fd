"""Tensor + expert parallelism over torch.distributed: which part of each layer a rank holds (plan), the module
surgery that makes a model hold only that part (shard), and the collectives it needs (comm)."""
