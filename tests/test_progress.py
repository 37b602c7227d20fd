"""Progress bars (qwen3next/progress.py): drawn on a terminal while loading, quantizing and saving; silent when stderr
is not a terminal and when the `qwen3next` logger is at WARNING or above."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
import torch

from qwen3next.checkpoint import load_model, save_model
from qwen3next.progress import progress, progress_enabled
from qwen3next.quant import quantize_model
from tiny_models import make_model

BAR_MARKS = ("Loading weights", "Quantizing", "Saving weights", "%|")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_terminal(monkeypatch) -> FakeTerminal:
    """stderr replaced by a terminal (in the test body: pytest's capture resets sys.stderr after fixtures run)."""
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.fixture
def logger_level():
    logger = logging.getLogger("qwen3next")
    old = logger.level
    yield logger.setLevel
    logger.setLevel(old)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    save_model(make_model("base", mtp=False), d)
    return d


def work(checkpoint, out) -> None:
    """Everything that draws a bar: load, quantize (after loading and while loading), save."""
    save_model(quantize_model(load_model(checkpoint, dtype="float32"), 8), out)
    load_model(checkpoint, dtype="float32", quantize="int8")


def test_bars_on_a_terminal(checkpoint, tmp_path, monkeypatch, logger_level):
    terminal = fake_terminal(monkeypatch)
    logger_level(logging.NOTSET)
    assert progress_enabled()
    logger_level(logging.INFO)
    assert progress_enabled()
    work(checkpoint, tmp_path / "q")
    drawn = terminal.getvalue()
    assert "Loading weights" in drawn and "Loading weights, quantizing to int8" in drawn
    assert "Quantizing to int8" in drawn and "Saving weights" in drawn and "100%" in drawn


@pytest.mark.parametrize("level", [logging.WARNING, logging.ERROR])
def test_no_bars_at_warning_level(checkpoint, tmp_path, monkeypatch, logger_level, level):
    terminal = fake_terminal(monkeypatch)
    logger_level(level)
    assert not progress_enabled()
    work(checkpoint, tmp_path / "q")
    assert terminal.getvalue() == ""


def test_no_bars_when_stderr_is_not_a_terminal(checkpoint, tmp_path, capsys):
    assert not progress_enabled()  # pytest's captured stderr is no terminal
    work(checkpoint, tmp_path / "q")
    assert capsys.readouterr().err == ""
    with progress(total=3, desc="x") as bar:  # a disabled bar still takes updates
        bar.update(3)


def test_cli_in_a_subprocess_prints_no_bar(checkpoint, tmp_path):
    """`qwen3next quantize` loads, quantizes and saves with stderr on a pipe: no bar, nothing on stderr."""
    r = subprocess.run([sys.executable, "-m", "qwen3next.cli", "quantize", "--model", str(checkpoint), "--out",
                        str(tmp_path / "q"), "--bits", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert not any(mark in r.stderr for mark in BAR_MARKS), r.stderr
    assert isinstance(load_model(tmp_path / "q").lm_head.qweight, torch.Tensor)
