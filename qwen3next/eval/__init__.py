"""Evaluation: what a model does with long inputs, and how well it calls tools.

- `loss`: per-token loss over long texts, chunk by chunk through the model's cache (never [T, vocab] logits), and
  its one-forward twin; bucketing of losses by position;
- `ppl`: `qwen3next eval ppl` (loss by position bucket per context length, optionally with `--hf-overrides`, e.g.
  YaRN, against the model as shipped);
- `passkey`: `qwen3next eval passkey` (RULER-style single-needle retrieval through the engine);
- `text`: the evaluation text (a UTF-8 file, or `austen:NAME`, one of Jane Austen's novels from the corpus builder);
- `table`: the plain-text tables of their reports;
- `plots`: the PNGs (matplotlib, the optional `[plot]` extra);
- `tool_calls`, `model_card`: tool-call scoring and sample outputs of a trained model through the engine, and the
  model card written from them (`python -m qwen3next.eval.model_card`).

This package may drive the engine; `train/` does not (it imports neither the engine nor this package).
"""
