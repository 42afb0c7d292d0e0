"""Shared fixtures: a tiny real corpus (a slice of the Python standard library), its tokenizer and token
cache, built once per test session in a temporary folder, plus helpers to run qwenjax in a subprocess.

The main pytest process sees ONE CPU device; tests that need several devices or processes start
subprocesses with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (it must be set before JAX starts).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "tiny.yaml"


@pytest.fixture
def full_precision_matmuls():
    """float32 matmuls at full precision on any backend (GPUs default to TF32): the tolerances hold there."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def run_cli(capsys):
    """Run `qwenjax ARGS...` in-process; returns (exit status, stdout, stderr)."""
    from qwenjax import cli

    def run(*argv):
        status = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="session")
def qwenjax_cache(tmp_path_factory) -> Path:
    """A cache root for this session: tokenizers, token caches and JAX's compilation cache live here, so
    subprocesses of the same session reuse what the first run built or compiled."""
    return tmp_path_factory.mktemp("qwenjax-cache")


@pytest.fixture(scope="session")
def tiny_config(qwenjax_cache):
    """configs/tiny.yaml with the session cache (a RunConfig; `.replace(**{"train.steps": 5})` to vary)."""
    from qwenjax.run_config import load_config

    return load_config(TINY, [f"data.cache_dir={qwenjax_cache}"])


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    """The tiny corpus prepared once: `.tokenizer_path`, `.caches` (TokenCaches), `.vocab_size`, `.eos_id`."""
    from qwenjax.train import prepare_data

    return prepare_data(tiny_config)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tiny_data) -> Path:
    return Path(tiny_data.tokenizer_path)


@pytest.fixture(scope="session")
def tiny_token_cache(tiny_data):
    return tiny_data.caches[0]


def tiny_overrides(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """KEY=VALUE overrides for configs/tiny.yaml in a test (session cache, given run dir)."""
    return [f"data.cache_dir={cache}", f"run_dir={run_dir}", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """Environment for a qwenjax subprocess: the repo importable, N host CPU devices, single-threaded
    helpers (the CI machine has two cores), plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for key in ("QWENJAX_COORDINATOR", "QWENJAX_NUM_PROCESSES", "QWENJAX_PROCESS_ID",
                "JAX_COORDINATOR_ADDRESS"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_python(code: str, *args: str, devices: int = 1, timeout: float = 300, cwd=None,
               **env: str) -> subprocess.CompletedProcess:
    """Run `python -c code args...` with `devices` CPU devices; returns the completed process (text)."""
    return subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(devices, **env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# Train with configs/tiny.yaml and overrides from argv; print the summary as JSON on the last line.
TRAIN_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
logging.getLogger("qwenjax").setLevel(logging.INFO)
from qwenjax.run_config import load_config
from qwenjax.train import train
print(json.dumps(train(load_config(sys.argv[1], sys.argv[2:]))))
"""
