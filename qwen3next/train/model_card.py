"""Evaluate a trained demo model the way its users will use it, and write its model card.

`python -m qwen3next.train.model_card MODEL_DIR --tool-eval runs/synthetic/tool_eval.jsonl --command "..."`
- tool-call success on held-out synthetic prompts (greedy, through the engine and the runtime chat template):
  a prompt succeeds when the parsed `<tool_call>` blocks equal the expected calls exactly (names and arguments),
  or, for prompts that need no tool, when the model answers without calling one;
- sample outputs for a few fixed prompts;
- the training summary (tokens seen, held-out loss / perplexity, MTP top-1 accuracy) from `train_summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..engine.llm import Engine
from ..engine.sampling import SamplingParams
from ..tool_calls import parse_tool_calls

SAMPLE_PROMPTS = [
    ("text", "It is a truth universally acknowledged, that"),
    ("text", "Elizabeth looked at her sister and said,"),
    ("text", "In the beginning"),
    ("chat", "Hello!"),
    ("chat", "What is the capital of France?"),
    ("chat", "How many letters are in the word 'garden'?"),
]


def evaluate_tool_calls(engine: Engine, rows: list[dict], max_tokens: int = 64) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    reqs = [engine.add_request(engine.tokenizer.encode(r["prompt"]), params) for r in rows]
    while engine.step():
        pass
    stats = {"total": 0, "ok": 0, "calls_expected": 0, "calls_ok": 0, "names_ok": 0, "well_formed": 0,
             "blocks": 0, "seen": [0, 0], "unseen": [0, 0]}
    failures = []
    for r, req in zip(rows, reqs):
        text = req.output().text
        _, calls = parse_tool_calls(text)
        expected = r["expected_tool_calls"]
        ok = calls == expected
        stats["total"] += 1
        stats["ok"] += ok
        stats["names_ok"] += [c["name"] for c in calls] == [e["name"] for e in expected]
        blocks = text.count("<tool_call>")
        stats["blocks"] += blocks
        stats["well_formed"] += len(calls)
        if expected:
            stats["calls_expected"] += 1
            stats["calls_ok"] += ok
        key = "seen" if r.get("seen_in_train") else "unseen"
        stats[key][0] += ok
        stats[key][1] += 1
        if not ok and len(failures) < 3:
            failures.append({"user": r["messages"][-1]["content"], "expected": expected, "got": text})
    stats["success_rate"] = stats["ok"] / max(stats["total"], 1)
    stats["tool_prompt_success_rate"] = stats["calls_ok"] / max(stats["calls_expected"], 1)
    stats["well_formed_rate"] = stats["well_formed"] / max(stats["blocks"], 1)
    stats["decision_rate"] = stats["names_ok"] / max(stats["total"], 1)
    stats["failures"] = failures
    return stats


def sample_outputs(engine: Engine, max_tokens: int = 60) -> list[tuple[str, str, str]]:
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=max_tokens, repetition_penalty=1.1)
    out = []
    for kind, prompt in SAMPLE_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if kind == "chat" else prompt
        req = engine.add_request(tok.encode(text), params)
        while engine.step():
            pass
        out.append((kind, prompt, req.output().text))
    return out


def write_card(model_dir: Path, summary: dict, tools: dict, samples: list, command: str) -> str:
    cfg = json.loads((model_dir / "config.json").read_text())
    size_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6
    data = summary.get("data", {})
    val_loss = summary.get("val_loss")
    lines = [
        "# qwen3next demo model",
        "",
        "A small model with the full Qwen3-Next architecture (Gated DeltaNet : gated attention = 3 : 1, sparse MoE "
        "with a shared expert on every layer, zero-centred RMSNorm, one MTP layer), trained from scratch on two CPU "
        "cores by this repository, so that `generate`, `chat`, `serve` and `bench` work out of the box. It writes "
        "Austen-flavoured prose and follows the ChatML chat/tool-call format on simple prompts; it knows nothing "
        "else. Not a useful assistant: a test fixture you can talk to.",
        "",
        "## Architecture",
        f"- {cfg['num_hidden_layers']} layers ({', '.join(cfg['layer_types'])}), hidden {cfg['hidden_size']}, "
        f"{cfg['num_experts']} experts top-{cfg['num_experts_per_tok']} (width {cfg['moe_intermediate_size']}) + "
        f"shared expert {cfg['shared_expert_intermediate_size']}, vocab {cfg['vocab_size']}",
        f"- parameters: {summary['params']['total']:,} main + {summary['params']['mtp']:,} MTP "
        f"({summary['params']['active']:,} active per token); {size_mb:.1f} MB of bf16 safetensors",
        "- tokenizer: the real Qwen3 byte-level BPE truncated to its first 8,192 ranks (ids < 8192 equal Qwen3's) "
        "+ the 26 Qwen3 special tokens at 8192..8217 (`qwen3next tokenizer --from-qwen-ranks 8192`)",
        "",
        "## Data and licences",
        "- Jane Austen's six novels (public domain) from Debian `r-cran-janeaustenr` (MIT package)",
        "- synthetic ChatML conversations generated by `qwen3next.train.synthetic` (arithmetic, capitals, "
        "spelling, greetings, and tool calls to `calculator` / `get_weather`), written by this project",
        f"- groups and sizes: {json.dumps(data)}",
        "",
        "## Training and results",
        f"- tokens seen: {summary.get('tokens', 0):,} in {summary.get('steps')} steps, "
        f"{summary.get('train_seconds', 0) / 60:.0f} min on 2 CPU threads (fp32)",
    ]
    if val_loss is not None:
        lines.append(f"- held-out loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}); per group: "
                     + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in summary.items() if k.startswith("val_loss/")))
    if "val_mtp_acc" in summary:
        lines.append(f"- MTP head (predicts token t+2): held-out loss {summary['val_mtp_loss']:.3f}, top-1 accuracy "
                     f"{summary['val_mtp_acc']:.1%} (next-token top-1: {summary.get('val_acc', 0):.1%})")
    if "train_loss" in summary:
        lines.append(f"- final train loss {summary['train_loss']:.3f}")
    lines += [
        f"- tool calling on {tools['total']} held-out synthetic prompts (greedy): {tools['success_rate']:.1%} "
        f"exactly right overall; {tools['tool_prompt_success_rate']:.1%} of the prompts that need a tool call get "
        f"exactly the expected call(s); {tools['decision_rate']:.1%} make the right decision (call the expected "
        f"tool(s), or none when none is needed); {tools['well_formed_rate']:.1%} of emitted `<tool_call>` blocks "
        f"parse as JSON calls; "
        f"seen-in-training prompts {tools['seen'][0]}/{tools['seen'][1]}, unseen {tools['unseen'][0]}/"
        f"{tools['unseen'][1]}",
        "",
        "## Sample outputs (greedy, repetition penalty 1.1, 60 tokens)",
    ]
    for kind, prompt, text in samples:
        lines += ["", f"**{kind}: {prompt!r}**", "", "```", text.strip(), "```"]
    lines += ["", "## Reproduce", "", "```bash", command, "```", ""]
    card = "\n".join(lines)
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="evaluate the demo model and write its model card")
    p.add_argument("model_dir")
    p.add_argument("--tool-eval", required=True)
    p.add_argument("--summary", default=None, help="train_summary.json (default: MODEL_DIR/train_summary.json)")
    p.add_argument("--command", default="", help="the command that reproduces the model")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args(argv)
    model_dir = Path(args.model_dir)
    summary = json.loads(Path(args.summary or model_dir / "train_summary.json").read_text())
    rows = [json.loads(line) for line in Path(args.tool_eval).read_text().splitlines() if line.strip()]
    engine = Engine(model_dir, max_memory="512MiB", max_num_seqs=32, max_model_len=1024)
    tools = evaluate_tool_calls(engine, rows[: args.limit])
    samples = sample_outputs(engine)
    print(write_card(model_dir, summary, tools, samples, args.command))
    print(json.dumps({k: v for k, v in tools.items() if k != "failures"}, indent=1))
    for f in tools["failures"]:
        print("FAIL", json.dumps(f)[:400])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
