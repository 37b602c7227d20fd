"""The registry of the fast paths itself: entries, thresholds, switches and their errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwen3next.ops import dispatch
from qwen3next.ops.linear import _ONEDNN_OP, uses_onednn


def test_every_entry_names_real_code_for_both_twins():
    names = [p.name for p in dispatch.FAST_PATHS]
    assert len(names) == len(set(names))
    for p in dispatch.FAST_PATHS:
        assert p.does and p.guard, p.name
        assert callable(dispatch.resolve(p.fast)), p.fast
        assert callable(dispatch.resolve(p.reference)), p.reference
        assert p.fast != p.reference, p.name
        assert p.switch in (None, dispatch.FAST_DECODE_ENV, dispatch.LINEAR_ENV, dispatch.KERNELS_ENV,
                            dispatch.AOT_ENV, dispatch.HUGEPAGES_ENV), p.name


def test_default_thresholds():
    assert {p.name: p.threshold for p in dispatch.FAST_PATHS if p.threshold is not None} == {
        "onednn_linear": 1 << 18, "delta_rule_token_loop": 16, "experts_gathered": 16, "int8_kernel": 32,
        "quant_experts_few_tokens": 16, "native_linear": 8, "native_moe": 16,
        "attention_context_split": 1 << 20}
    assert dispatch.threshold("delta_rule_token_loop") == 16


def test_set_threshold_round_trips():
    old = dispatch.set_threshold("experts_gathered", 3)
    try:
        assert old == 16
        assert dispatch.threshold("experts_gathered") == 3
        assert dispatch.fast_path("experts_gathered").threshold == 16  # the default stays in the entry
        assert "experts_gathered [threshold 3," in dispatch.describe()
    finally:
        assert dispatch.set_threshold("experts_gathered", old) == 3
    assert dispatch.threshold("experts_gathered") == 16


def test_bad_names_and_values_are_rejected():
    with pytest.raises(ValueError, match=r"unknown fast path 'nope': expected one of onednn_linear, .*int8_kernel"):
        dispatch.threshold("nope")
    with pytest.raises(ValueError, match="unknown fast path 'nope'"):
        dispatch.set_threshold("nope", 1)
    with pytest.raises(ValueError, match="unknown fast path 'nope'"):
        dispatch.enabled("nope")
    with pytest.raises(ValueError, match=r"'int4_kernel' has no threshold; these do: onednn_linear, "):
        dispatch.threshold("int4_kernel")
    for bad in (-1, 2.5, True, "16"):
        with pytest.raises(ValueError, match=r"threshold 'int8_kernel': expected an integer >= 0"):
            dispatch.set_threshold("int8_kernel", bad)
    assert dispatch.threshold("int8_kernel") == 32


def test_fast_decode_switch_and_autograd():
    old = dispatch.set_fast_decode(True)
    try:
        assert not dispatch.fast_decode()  # autograd is recording
        with torch.no_grad():
            assert dispatch.fast_decode()
            assert dispatch.set_fast_decode(False) is True
            assert not dispatch.fast_decode()
            assert not dispatch.enabled("experts_gathered")
            assert dispatch.enabled("delta_rule_token_loop")  # no switch
            assert "experts_gathered [threshold 16, off with QWEN3NEXT_FAST_DECODE=0, switched off]" in (
                dispatch.describe())
    finally:
        dispatch.set_fast_decode(old)


@pytest.mark.skipif(_ONEDNN_OP is None, reason="this torch build has no oneDNN")
def test_onednn_threshold_is_read_at_call_time():
    x, w = torch.randn(2, 64), torch.randn(32, 64)
    with torch.no_grad():
        assert not uses_onednn(x, w)  # below the threshold
        old = dispatch.set_threshold("onednn_linear", 0)
        try:
            assert uses_onednn(x, w)
            previous = dispatch.set_linear_backend("torch")
            assert not uses_onednn(x, w) and not dispatch.enabled("onednn_linear")
            dispatch.set_linear_backend(previous)
        finally:
            dispatch.set_threshold("onednn_linear", old)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_environment_switches():
    code = ("import torch; from qwen3next.ops import dispatch; from qwen3next.ops.linear import uses_onednn\n"
            "with torch.no_grad():\n"
            "    print(dispatch.fast_decode(), dispatch.linear_backend(), "
            "uses_onednn(torch.randn(1, 1024), torch.randn(1024, 1024)))")
    run = _python(code, QWEN3NEXT_FAST_DECODE="0", QWEN3NEXT_LINEAR="torch")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "torch", "False"]
    off = _python("from qwen3next import kernels; from qwen3next.ops import dispatch\n"
                  "print(kernels.available(), dispatch.enabled('native_moe'))", QWEN3NEXT_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["False", "False"]
    for value, expected in (("0", "False"), ("1", "True")):
        aot = _python("from qwen3next.ops import dispatch; print(dispatch.enabled('aot_decode_step'))",
                      QWEN3NEXT_AOT=value)
        assert aot.returncode == 0, aot.stderr
        assert aot.stdout.split() == [expected]
    bad = _python("import qwen3next.ops.linear", QWEN3NEXT_LINEAR="mkl")
    assert bad.returncode != 0
    assert "ValueError: QWEN3NEXT_LINEAR: expected one of ('auto', 'torch'), got 'mkl'" in bad.stderr
