"""Run ``mim`` in a subprocess the way a user does, with a hard timeout that also ends DDP's child ranks."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Two CPU processes over gloo: how the tests run what users run on several GPUs.
DDP = ("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2")


def load_tool(name: str):
    """Import ``tools/<name>.py`` (a standalone script, not a package module) and return the module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args: str, timeout: float = 300) -> str:
    """Run ``python tools/<name>.py *args`` as a user does, inside ``timeout`` seconds; its stdout (a non-zero exit
    raises ``CalledProcessError``)."""
    tool = REPO / "tools" / f"{name}.py"
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=timeout,
                          check=True).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mim(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``python -m mim.cli *args`` in its own process group (stdout and stderr captured)."""
    full_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    if "ddp" in args:  # one torch thread per rank process: 2 ranks share the 2 cores of the CI machine
        full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "mim.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=cwd or REPO, start_new_session=True)


def finish_mim(proc: subprocess.Popen, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_mim` process; past ``timeout`` seconds the whole group (DDP's rank processes
    included) is killed and the test fails, so a hang never stalls CI. With ``check`` a non-zero exit fails the
    test with the end of stderr."""
    args = proc.args[3:]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mim {' '.join(args)} did not finish in {timeout} s (a hang?)\n{err[-3000:]}")
    finally:
        try:  # rank processes left behind by a crash
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and res.returncode != 0:
        pytest.fail(f"mim {' '.join(args)} exited with {res.returncode}:\n{err[-4000:]}")
    return res


def run_mim(*args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """``python -m mim.cli *args``, waited for as :func:`finish_mim` says."""
    return finish_mim(start_mim(*args, env=env, cwd=cwd), timeout=timeout, check=check)
