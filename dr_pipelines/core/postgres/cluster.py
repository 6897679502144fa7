"""A PostgreSQL cluster on this host, run as the postgres OS user (initdb and postgres refuse root).

Used by the embedded sandbox, by restore drills and by the tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from dr_pipelines.core.child_env import server_env, tool_env
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.postgres.client import DEFAULT_PG_BIN

POSTGRES_USER = "postgres"


class ClusterError(DrError):
    pass


def _postgres_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise ClusterError(
            "there is no 'postgres' OS user; create it (useradd --system postgres) or install postgresql-15"
        ) from None
    return pw.pw_uid, pw.pw_gid


def run_as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a server-side command as the postgres user (directly when we already are not root)."""
    if os.geteuid() == 0:
        uid, gid = _postgres_ids()
        kw.setdefault("user", uid)
        kw.setdefault("group", gid)
        kw.setdefault("extra_groups", [])
    kw.setdefault("cwd", "/")
    kw.setdefault("env", tool_env())  # none of our secrets (a server we start is given its own: start())
    return subprocess.run(cmd, **kw)


def chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        uid, gid = _postgres_ids()
        os.chown(path, uid, gid)


def postgres_can_reach(path: Path) -> bool:
    """Whether the postgres user can traverse into `path` (pyenv and pytest dirs are 0700)."""
    if os.geteuid() != 0:
        return True
    probe = run_as_postgres(["test", "-x", str(path)], capture_output=True)
    return probe.returncode == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for a restored or scratch cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, data_dir: Path, port: int, bin_dir: Path = DEFAULT_PG_BIN):
        self.data_dir = Path(data_dir)
        self.port = port
        self.bin_dir = Path(bin_dir)

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def initdb(self, settings: dict[str, str] | None = None, wal_segsize_mb: int | None = None) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        chown_to_postgres(self.data_dir)
        cmd = [
            self.tool("initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-N",
        ]
        if wal_segsize_mb:
            cmd.append(f"--wal-segsize={wal_segsize_mb}")
        proc = run_as_postgres(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"initdb {self.data_dir} failed: {proc.stderr.strip()}")
        self.write_settings({"listen_addresses": "'127.0.0.1'", "unix_socket_directories": "''", **(settings or {})})

    def write_settings(self, settings: dict[str, str]) -> None:
        """Append to postgresql.auto.conf (later lines win), as the postgres user owns the file."""
        lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
        auto = self.data_dir / "postgresql.auto.conf"
        with open(auto, "a") as f:
            f.write(lines)
        chown_to_postgres(auto)

    def is_running(self) -> bool:
        proc = run_as_postgres([self.tool("pg_ctl"), "status", "-D", str(self.data_dir)], capture_output=True)
        return proc.returncode == 0

    def start(self, timeout: float = 60, env: dict[str, str] | None = None) -> None:
        """`env`: what the server (and the commands it runs) gets; default: core.child_env.server_env()."""
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise ClusterError(
                    f"cannot start PostgreSQL in {self.data_dir}: port {self.port} on 127.0.0.1 is already in use "
                    "(another cluster or sandbox?); stop it or choose another port"
                )
        proc = run_as_postgres(
            [
                self.tool("pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(timeout)),
                "-l",
                str(self.log_file),
                "-o",
                f"-p {self.port}",
            ],
            env=env if env is not None else server_env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = ""
            if self.log_file.exists():
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-10:])
            raise ClusterError(
                f"cannot start PostgreSQL in {self.data_dir} on port {self.port}: {proc.stderr.strip()}\n{tail}"
            )

    def stop(self, mode: str = "fast") -> None:
        if self.data_dir.exists():
            run_as_postgres(
                [self.tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"], capture_output=True
            )

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run(
                [self.tool("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True, env=tool_env()
            )
            if proc.returncode == 0:
                return
            time.sleep(0.1)
        raise ClusterError(f"PostgreSQL on port {self.port} not ready after {timeout}s")
