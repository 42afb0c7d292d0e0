"""qwenjax.post.sandbox: a candidate that loops, one that allocates too much and one that opens a network
socket are stopped or fail, each within its limits, and the next candidate still runs."""

from __future__ import annotations

import time

from qwenjax.post.sandbox import run_python


def test_passing_and_failing_programs():
    ok = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')\n")
    assert ok.passed and ok.returncode == 0 and "done" in ok.output
    bad = run_python("def f(x):\n    return x\nassert f(1) == 2\n")
    assert bad.status == "fail" and "AssertionError" in bad.output


def test_infinite_loop_is_killed_at_the_wall_time_limit():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout_s=1.5)
    assert r.status == "timeout" and time.perf_counter() - t0 < 10
    # a child that ignores the parent's end is killed with its process group
    r = run_python("import os, time\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    time.sleep(60)\n",
                   timeout_s=1.0)
    assert r.status == "timeout"
    assert run_python("print(1)").passed  # the run goes on


def test_too_much_memory_fails():
    r = run_python("x = bytearray(4 << 30)\nprint(len(x))\n", memory_bytes=512 << 20)
    assert r.status == "memory" and not r.passed, r
    assert run_python("x = bytearray(16 << 20)\n", memory_bytes=512 << 20).passed


def test_network_is_refused():
    prog = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "s.settimeout(2)\ns.connect(('1.1.1.1', 80))\nprint('connected')\n")
    r = run_python(prog, timeout_s=5)
    assert not r.passed and "connected" not in r.output
    assert "network access is disabled" in r.output
    # the lower-level module too (only the namespace stops it, where the kernel allows one)
    r = run_python("import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n",
                   timeout_s=5)
    assert not r.passed


def test_working_directory_is_a_fresh_temp_dir():
    r = run_python("import os\nopen('x.txt', 'w').write('hi')\nprint(sorted(os.listdir('.')))\n")
    assert r.passed and "candidate.py" in r.output and "x.txt" in r.output
