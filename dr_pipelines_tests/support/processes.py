"""Processes and directories the tests need: the installed command, ports, dirs the postgres user can reach."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], object], what: str, timeout: float = 30, every: float = 0.1) -> object:
    """The check's first truthy value, polled every `every` seconds; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s")


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def sandbox_ports() -> int:
    """A port for a sandbox's cluster whose next two (its API and frontend services, port + 1 and
    + 2) are free too, outside the kernel's ephemeral range where it leaves room (else anywhere):
    free_port() gives a port in that range, where any client socket may hold port + 1 by the time
    the service binds it (CI saw the sandbox's API fail to start so)."""
    import random

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(n) for n in f.read().split())
    spans = [(a, b) for a, b in ((20000, low - 3), (high + 1, 65533)) if b - a > 100] or [(20000, 65533)]
    for _ in range(200):
        port = random.randrange(*random.choice(spans))
        try:
            for p in (port, port + 1, port + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no three free consecutive ports outside the ephemeral range on 127.0.0.1")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and whatever of its group outlived it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the group is gone
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that ignored SIGTERM or outlived their parent
    except ProcessLookupError:
        pass
    proc.wait()


REACHABLE_DIRS: list[Path] = []


def reachable_tmpdir(prefix: str) -> Path:
    """A directory the postgres user can reach (pytest's tmp_path is 0700 under root's tree);
    removed at the end of the session if the test did not remove it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    REACHABLE_DIRS.append(d)
    return d


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("DAGSTER_HOME", None) if env is None or "DAGSTER_HOME" not in env else None
    return subprocess.run(
        [str(VENV_BIN / "dr-pipelines"), *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
