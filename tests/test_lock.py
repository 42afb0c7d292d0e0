"""One writer per run directory: a second `qwenjax train` on a busy run_dir exits 2 naming the holder; a lock
left by a dead process is taken over with a warning; a run_dir that is a file is one line, exit 2."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import pytest
from conftest import TINY, subprocess_env, tiny_overrides
from test_preempt import CLI, start_train, wait_for_steps

from qwenjax.errors import UserError
from qwenjax.lock import DirLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_second_holder_and_releases(tmp_path):
    with DirLock(tmp_path / "d", "run_dir"):
        holder = json.loads((tmp_path / "d" / ".lock").read_text())
        assert holder["pid"] > 0 and holder["host"] == socket.gethostname()
        code = (f"from qwenjax.lock import DirLock\nDirLock({str(tmp_path / 'd')!r}, 'run_dir').acquire()")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=subprocess_env())
        assert other.returncode != 0 and f"is in use by pid {holder['pid']} on host" in other.stderr
    assert not (tmp_path / "d").exists()  # created by the lock, still empty: removed again
    DirLock(tmp_path / "d").acquire().release()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="qwenjax"), DirLock(tmp_path, "run_dir"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] != 0
    assert "taking over the stale lock of pid" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / ".lock").exists() and tmp_path.is_dir()


def test_run_dir_is_a_file(tiny_config, tmp_path):
    f = tmp_path / "run"
    f.write_text("not a directory")
    with pytest.raises(UserError, match="is a file, not a directory"):
        DirLock(f, "run_dir").acquire()
    proc = subprocess.run([*CLI, "train", str(TINY), *tiny_overrides(tiny_config.data.cache_dir, f)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qwenjax: error: run_dir {f} ") and "not a directory" in lines[0]
    assert f.read_text() == "not a directory"


@pytest.mark.slow
def test_two_trainers_on_one_run_dir(tiny_config, tiny_data, tmp_path):
    cache, run_dir = tiny_config.data.cache_dir, tmp_path / "run"
    first = start_train(cache, run_dir, "train.steps=5000")
    try:
        wait_for_steps(first, run_dir, 2)
        second = subprocess.run([*CLI, "train", str(TINY), *tiny_overrides(cache, run_dir)],
                                env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"qwenjax: error: {run_dir} is in use by pid "
                                                       f"{first.pid} on host {socket.gethostname()}"), lines
        assert lines[0].endswith("; wait for it or stop it")
        assert first.poll() is None  # the holder goes on
    finally:
        first.kill()
        first.wait()
