"""Run untrusted Python (a model's candidate program plus its tests) in a limited subprocess.

Execution feedback for `qwenjax pairs` (docs/post-training.md, "Pairs and the sandbox"). Each run gets:

- its own temporary directory as the working directory (deleted afterwards) and an empty environment;
- a wall-time limit: the whole process group is killed (SIGKILL) when it passes;
- resource limits set in the child before exec: address space (RLIMIT_AS), CPU seconds, file size, open files;
- no network: a new network namespace with only a down loopback (`unshare -rn`) when the kernel allows user
  namespaces, and in any case `socket.socket`/`socket.create_connection` replaced by functions that raise
  before the candidate runs.

This is a guard against runaway or careless candidates (loops, huge allocations, stray network calls), not
a security boundary against a hostile program: the candidate runs as this user and can read what this user
can read. Run `qwenjax pairs` on a machine or container you are willing to expose to its candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

#: prepended to every program: its limits (set by the child itself, so the parent forks no Python code:
#: a fork hook in a multithreaded parent such as JAX's can deadlock), then sockets refused from Python even
#: where no network namespace is available
_PRELUDE = """\
import resource as _r
for _k, _v in {limits!r}:
    _r.setrlimit(getattr(_r, _k), (_v, _v))
del _r, _k, _v
import socket as _s
def _refused(*a, **k):
    raise OSError("network access is disabled in the qwenjax sandbox")
_s.socket = _refused
_s.create_connection = _refused
_s.socketpair = _refused
del _s, _refused
"""


@dataclasses.dataclass(frozen=True)
class Result:
    """How a program ended: `status` is pass (exit 0), fail (another exit status), timeout (killed at the
    wall-time limit) or memory (a MemoryError or a kill for memory); `output` is the end of stdout + stderr."""

    status: str
    returncode: int | None
    wall_s: float
    output: str

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (a user + network namespace) works on this machine."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(memory_bytes: int, cpu_s: int, file_bytes: int) -> list[tuple[str, int]]:
    return [("RLIMIT_AS", memory_bytes), ("RLIMIT_CPU", cpu_s), ("RLIMIT_FSIZE", file_bytes),
            ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)]


def run_python(program: str, *, timeout_s: float = 10.0, memory_bytes: int = 1 << 30,
               file_bytes: int = 16 << 20, max_output: int = 4000) -> Result:
    """Run `program` (Python source) with the limits above; never raises for anything the program does."""
    with tempfile.TemporaryDirectory(prefix="qwenjax-sandbox-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(_PRELUDE.format(limits=_limits(memory_bytes, int(timeout_s) + 1, file_bytes)) + program)
        cmd = [sys.executable, "-I", "-S", "-B", path]  # isolated: no site, no user paths, no env vars
        if network_namespace_available():
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": tmp},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, killed as one
        try:
            out, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - t0
    text = out.decode("utf-8", "replace")[-max_output:]
    rc = proc.returncode
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and wall >= timeout_s:
        status = "timeout"
    elif "MemoryError" in text or rc == -signal.SIGKILL:
        status = "memory"
    else:
        status = "pass" if rc == 0 else "fail"
    return Result(status, rc, wall, text)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
