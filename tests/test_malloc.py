"""qwen3next/malloc.py: the commands that run a model re-execute themselves once on tcmalloc (or jemalloc) when the
system has one, unless told not to or an allocator is preloaded already."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qwen3next.malloc import ENV, find_allocator, relaunch_env
from tiny_models import make_model, write_byte_tokenizer

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: Linux only")


def libs(tmp_path, *names):
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return (str(tmp_path),)


@linux
def test_relaunch_env_prefers_tcmalloc_and_keeps_other_preloads(tmp_path):
    dirs = libs(tmp_path, "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    env = relaunch_env({"PATH": "/bin", "LD_PRELOAD": "/opt/libiomp5.so"}, dirs)
    assert env["LD_PRELOAD"] == f"{tmp_path}/libtcmalloc_minimal.so.4:/opt/libiomp5.so"
    assert env[ENV] == "tcmalloc" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert relaunch_env(env, dirs) is None  # the relaunched process runs the command
    (tmp_path / "je").mkdir()
    only_je = libs(tmp_path / "je", "libjemalloc.so.2")
    assert relaunch_env({}, only_je)["LD_PRELOAD"] == f"{tmp_path}/je/libjemalloc.so.2"


@linux
def test_relaunch_env_leaves_a_chosen_or_missing_allocator_alone(tmp_path):
    dirs = libs(tmp_path, "libtcmalloc_minimal.so.4")
    assert relaunch_env({ENV: "system"}, dirs) is None
    assert relaunch_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, dirs) is None
    assert relaunch_env({}, (str(tmp_path / "nowhere"),)) is None
    assert find_allocator((str(tmp_path / "nowhere"),)) is None


@linux
@pytest.mark.skipif(find_allocator() is None, reason="no tcmalloc / jemalloc installed here")
def test_chat_process_runs_on_the_installed_allocator(tmp_path):
    """`python -m qwen3next.cli chat` (as the `qwen3next` script runs it): the same process, re-executed, has the
    allocator mapped while it waits for input; with QWEN3NEXT_MALLOC=system it does not."""
    make_model("base", vocab_size=261).save_pretrained(tmp_path)
    write_byte_tokenizer(tmp_path)
    name = find_allocator()[0]
    for choice, want in (("auto", True), ("system", False)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", ENV: choice}
        env.pop("LD_PRELOAD", None)
        p = subprocess.Popen([sys.executable, "-m", "qwen3next.cli", "chat", "--model", str(tmp_path), "--threads",
                              "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            maps = ""
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and p.poll() is None:
                with open(f"/proc/{p.pid}/maps") as f:
                    maps = f.read()
                if "torch" in maps:  # past the relaunch (it happens before torch is imported)
                    break
                time.sleep(0.05)
            assert "torch" in maps, "the chat process did not start"
            assert (f"lib{name}" in maps) == want
        finally:
            p.communicate(b"/exit\n", timeout=120)
        assert p.returncode == 0
