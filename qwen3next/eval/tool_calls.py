"""Tool-call scoring and sample outputs of a trained model, greedy through the engine and the runtime chat template.

- `evaluate_tool_calls`: a prompt succeeds when the parsed `<tool_call>` blocks equal the expected calls exactly (names
  and arguments), or, for prompts that need no tool, when the model answers without calling one;
- `sample_outputs`: the model's replies to a few fixed prompts (text continuations and chat turns).
Both feed the model card (`eval.model_card`).
"""

from __future__ import annotations

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
