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


@linux
@pytest.mark.skipif(find_allocator() is None or sys.version_info < (3, 11),
                    reason="needs an allocator to relaunch with, and PYTHONSAFEPATH (Python 3.11+)")
def test_relaunched_script_does_not_import_from_the_current_directory(tmp_path):
    """The `qwen3next` script imports the installed package; its relaunch (`python -m qwen3next.cli`) must too, even
    when the current directory holds another `qwen3next` (here one that would print and exit)."""
    fake = tmp_path / "qwen3next"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("print('the wrong qwen3next')\n")
    script = "import sys\nfrom qwen3next.cli import main\nsys.argv = ['qwen3next', 'generate', '--help']\nmain()\n"
    env = {**os.environ, ENV: "auto"}
    env.pop("LD_PRELOAD", None)
    env.pop("PYTHONSAFEPATH", None)
    launcher = tmp_path / "bin"
    launcher.mkdir()
    (launcher / "qwen3next").write_text(script)  # what pip's console-script wrapper does, run from another directory
    r = subprocess.run([sys.executable, str(launcher / "qwen3next")], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=120)
    assert "the wrong qwen3next" not in r.stdout
    assert "--max-tokens" in r.stdout, r.stderr  # generate's help, from the installed package
