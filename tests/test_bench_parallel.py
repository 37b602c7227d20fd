"""`qwen3next bench --tensor-parallel-size 2` on a tiny model: the report's fields (load peak RSS of each rank,
decode on 1 and 2 ranks, time in collectives, all-reduces per step) and the option checks; never timings."""

from __future__ import annotations

import json

from qwen3next.cli import main
from tiny_models import make_model


def test_report_on_a_tiny_model(tmp_path, capsys):
    model = make_model("base")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tp.json"
    assert main(["bench", "--tensor-parallel-size", "2", "--model", str(tmp_path / "model"), "--batch", "1", "2",
                 "--prompt-len", "8", "--decode-tokens", "3", "--repeat", "1", "--json", str(out)]) == 0
    section = json.loads(out.read_text())["tensor_parallel"]
    assert len(section["load_peak_rss"]["1"]) == 1 and len(section["load_peak_rss"]["2"]) == 2
    assert all(b > 0 for b in section["load_peak_rss"]["2"])
    config = model.config
    for row in section["decode"]:
        assert row["tok_s_1"] > 0 and row["tok_s_2"] > 0 and row["comm_us_per_step"] > 0
        # a decode step: an all-reduce per sublayer and per embedding lookup
        assert row["all_reduces_per_step"] == 2 * config.num_hidden_layers + 1
    assert [s["rank"] for s in section["rank_stats_end"]] == [0, 1]
    assert "collectives us/step" in capsys.readouterr().out


def test_option_checks(capsys):
    assert main(["bench", "--tensor-parallel-size", "2", "--compile"]) == 1
    assert "--compile do not apply to --tensor-parallel-size" in capsys.readouterr().err
    assert main(["bench", "--tensor-parallel-size", "2", "--structured-output"]) == 1
    assert "separate modes" in capsys.readouterr().err
