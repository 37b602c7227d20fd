"""The synthetic training conversations and the runtime chat template must render byte-identically, so the demo
model is trained on exactly the format it is served with."""

from __future__ import annotations

from qwen3next.tokenizer import DEFAULT_CHAT_TEMPLATE, compile_chat_template, render_chat_template
from qwen3next.tool_calls import parse_tool_calls
from qwen3next.train.synthetic import generate_chat_examples, render_chatml


def test_training_render_equals_runtime_template():
    template = compile_chat_template(DEFAULT_CHAT_TEMPLATE)
    examples = generate_chat_examples(300, seed=7)
    assert any(ex.tools for ex in examples) and any(not ex.tools for ex in examples)
    for ex in examples:
        ours = render_chatml(ex.messages, ex.tools)
        runtime = render_chat_template(template, {"messages": ex.messages, "tools": ex.tools,
                                                  "add_generation_prompt": False})
        assert ours == runtime


def test_training_tool_calls_parse():
    n_calls = 0
    for ex in generate_chat_examples(200, seed=8):
        for m in ex.messages:
            if m["role"] == "assistant" and "<tool_call>" in (m.get("content") or ""):
                _, calls = parse_tool_calls(m["content"])
                n_calls += len(calls)
            for call in m.get("tool_calls") or []:
                n_calls += 1
                assert call["function"]["name"] in {t["function"]["name"] for t in ex.tools}
    assert n_calls > 20
