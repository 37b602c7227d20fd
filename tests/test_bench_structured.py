"""`qwen3next bench --structured-output`: JSON-constrained vs plain decode and grammar compile times on the demo
model at tiny sizes. Checked: the report's fields, that the constrained runs really ran under the grammar (grammar
time recorded, outputs valid JSON prefixes), and the option checks; never timings."""

from __future__ import annotations

import json

import pytest

from qwen3next import DEFAULT_MODEL
from qwen3next.bench import structured
from qwen3next.cli import main
from qwen3next.engine.llm import Engine
from qwen3next.engine.sampling import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="demo model not built")


def test_report_on_the_demo_model(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "--structured-output", "--threads", "1", "--batch", "1", "2", "--decode-tokens", "6",
                 "--repeat", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["structured_output"]
    assert [r["batch"] for r in report["decode"]] == [1, 2]
    for r in report["decode"]:
        assert r["plain_tokens_per_s"] > 0 and r["json_tokens_per_s"] > 0
        assert r["grammar_ms_per_step"] > 0 and len(r["json_rounds"]) == 1
    for name in ("weather schema", "10 tools, tool_choice required", "10 tools, tool_choice auto"):
        assert report["compile"][name]["median_ms"] > 0
    text = capsys.readouterr().out
    assert "grammar ms/step" in text and "10 tools, tool_choice auto" in text


def test_the_schema_holds_the_timed_tokens_and_ten_tools_compile():
    """The bench's list schema constrains every one of many tokens (a greedy run stays inside it and does not end),
    and its 10-tool grammars compile."""
    engine = Engine(DEFAULT_MODEL, max_memory="64MiB", max_model_len=512, enable_prefix_caching=False)
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": structured.QUESTIONS[0]}],
                                                add_generation_prompt=True))
    req = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True,
                                                    structured_outputs=StructuredOutputsParams(
                                                        json=structured.REPORTS)))
    while engine.step():
        pass
    text = req.output().outputs[0].text
    assert text.startswith('{"reports": [{"city": "') and len(req.output().outputs[0].token_ids) == 120
    assert engine.stats["grammar_seconds"] > 0
    assert len(structured.ten_tools()) == 10


def test_option_checks(capsys, tmp_path):
    assert main(["bench", "--structured-output", "--compile"]) == 1
    assert "--compile do not apply to --structured-output" in capsys.readouterr().err
    assert main(["bench", "--structured-output", "--workload", "cache-miss"]) == 1
    assert "separate modes" in capsys.readouterr().err
    assert main(["bench", "--structured-output", "--model", str(tmp_path)]) == 1  # no tokenizer.json there
    assert "constrained decoding needs the model's tokenizer" in capsys.readouterr().err
