"""Fixtures that start real servers on 127.0.0.1: PostgreSQL 15 clusters (as the postgres OS user),
moto's S3 server and the GCS emulator. Reset between tests, always torn down."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pyrage
import pytest
import yaml

from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, free_port
from dr_pipelines.core.config import load_config
from dr_pipelines.sandbox.sample_data import SAMPLE_DATA, SAMPLE_SCHEMA, SAMPLE_SIZES

VENV_BIN = Path(sys.executable).parent


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_REACHABLE_DIRS: list[Path] = []


def reachable_tmpdir(prefix: str) -> Path:
    """A directory the postgres user can reach (pytest's tmp_path is 0700 under root's tree);
    removed at the end of the session if the test did not remove it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    _REACHABLE_DIRS.append(d)
    return d


@pytest.fixture(scope="session", autouse=True)
def _remove_reachable_dirs() -> Iterator[None]:
    yield
    for d in _REACHABLE_DIRS:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Path]:
    """One initdb per session; every cluster is a copy (much faster than initdb each time)."""
    root = reachable_tmpdir("drpt-template-")
    chown_to_postgres(root)
    cluster = LocalCluster(root / "data", port=0)
    cluster.initdb({"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off",
                    "shared_buffers": "'64MB'", "max_wal_senders": "4", "wal_level": "replica"},
                   wal_segsize_mb=1)
    yield cluster.data_dir
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class PgServer:
    cluster: LocalCluster
    root: Path

    @property
    def port(self) -> int:
        return self.cluster.port

    def connect(self, dbname: str = "postgres", **kw) -> psycopg.Connection:
        kw.setdefault("user", "postgres")
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, autocommit=True, **kw)

    def create_database(self, name: str, sample_data: bool = True) -> None:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        if sample_data:
            with self.connect(name, ) as conn:
                conn.execute(SAMPLE_SCHEMA)
                for statement in SAMPLE_DATA:
                    conn.execute(statement, SAMPLE_SIZES)

    def row_counts(self, dbname: str) -> dict[str, int]:
        from dr_pipelines.core.postgres.client import table_row_counts

        with self.connect(dbname) as conn:
            return table_row_counts(conn)

    def table_checksums(self, dbname: str) -> dict[str, str]:
        """md5 of every user table's rows in a stable order: compares content, not just counts."""
        with self.connect(dbname) as conn:
            tables = conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1").fetchall()
            return {t: conn.execute(
                f"SELECT md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) FROM {t} x"
            ).fetchone()[0] for (t,) in tables}


@pytest.fixture
def make_pg(pg_template: Path) -> Iterator[Callable[..., PgServer]]:
    servers: list[PgServer] = []

    def make(hba: str | None = None) -> PgServer:
        root = reachable_tmpdir("drpt-pg-")
        chown_to_postgres(root)
        data = root / "data"
        subprocess.run(["cp", "-a", str(pg_template), str(data)], check=True)
        cluster = LocalCluster(data, free_port())
        if hba is not None:
            (data / "pg_hba.conf").write_text(hba)
            chown_to_postgres(data / "pg_hba.conf")
        cluster.start()
        server = PgServer(cluster, root)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.cluster.stop("immediate")
        shutil.rmtree(s.root, ignore_errors=True)


@pytest.fixture
def pg(make_pg) -> PgServer:
    """A running cluster with database `app` holding the SoundHash sample tables."""
    server = make_pg()
    server.create_database("app")
    return server


# --------------------------------------------------------------------------- S3 (moto) and GCS


@dataclass
class HttpServer:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def start_moto() -> HttpServer:
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port)
    return HttpServer(proc, port)


def start_gcs_emulator() -> HttpServer:
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port)
    return HttpServer(proc, port)


@pytest.fixture(scope="session", autouse=True)
def _aws_env() -> None:
    # moto accepts any credentials; these keep boto3 from looking for real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[HttpServer]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[HttpServer]:
    server = start_gcs_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    yield server
    server.stop()
    os.environ.pop("STORAGE_EMULATOR_HOST", None)


BUCKET = "dr-backups"


@pytest.fixture
def s3(s3_server: HttpServer) -> HttpServer:
    """The S3 server, wiped, with an empty bucket."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{s3_server.url}/moto-api/reset", method="POST"))
    boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture
def gcs(gcs_server: HttpServer) -> HttpServer:
    """The GCS emulator, wiped, with an empty bucket."""
    from dr_pipelines.core.config import GCSLocationConfig
    from dr_pipelines.core.storage.gcs import gcs_client

    urllib.request.urlopen(f"{gcs_server.url}/wipe")
    gcs_client(GCSLocationConfig(type="gcs", bucket=BUCKET)).create_bucket(BUCKET)
    return gcs_server


# --------------------------------------------------------------------------- keys and configs


@dataclass
class AgeKey:
    identity_file: Path
    recipient: str


@pytest.fixture
def age_key(tmp_path: Path) -> AgeKey:
    ident = pyrage.x25519.Identity.generate()
    path = tmp_path / "identity.txt"
    path.write_text(f"{ident}\n")
    path.chmod(0o600)
    return AgeKey(path, str(ident.to_public()))


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config YAML for `pg` and the chosen locations; returns its path."""

    def write(pg: PgServer, locations: dict, encryption: dict | None = None, dbname: str = "app",
              name: str = "app", **extra) -> Path:
        data = {
            "databases": {name: {"host": "127.0.0.1", "port": pg.port, "user": "postgres", "dbname": dbname,
                                 **extra.pop("database", {})}},
            "locations": locations,
            "encryption": encryption or {"method": "none"},
            **extra,
        }
        path = tmp_path / "dr.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def local_location(path: Path) -> dict:
    return {"type": "local", "path": str(path)}


def s3_location(server: HttpServer, prefix: str = "soundhash-backups/") -> dict:
    return {"type": "s3", "bucket": BUCKET, "prefix": prefix, "endpoint_url": server.url,
            "region": "us-east-1", "storage_class": "STANDARD_IA", "sse": "AES256", "multipart_chunk_mb": 5}


def gcs_location(prefix: str = "soundhash-backups/") -> dict:
    return {"type": "gcs", "bucket": BUCKET, "prefix": prefix, "project": "test", "chunk_mb": 1}


@pytest.fixture
def three_locations(tmp_path, s3, gcs) -> dict:
    return {"local": local_location(tmp_path / "backups"), "s3": s3_location(s3), "gcs": gcs_location()}


def config_from(path: Path):
    return load_config(path)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("DAGSTER_HOME", None) if env is None or "DAGSTER_HOME" not in env else None
    return subprocess.run([str(VENV_BIN / "dr-pipelines"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


# --------------------------------------------------------------------------- alert receiver


class AlertReceiver:
    """A real HTTP server on 127.0.0.1 that records the JSON posted to it; can be stopped and
    started again on the same port (a receiver that is down, then back)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict]] = []
        self.status = 200
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "AlertReceiver":
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.status < 300:
                    receiver.received.append((self.path, json.loads(body)))
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.received if p == path]


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    r = AlertReceiver()
    yield r
    r.stop()


@pytest.fixture
def pushgateway() -> Iterator[HttpServer]:
    exe = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"
    if not Path(exe).exists():
        pytest.fail("prometheus-pushgateway is not installed; run ./dev setup (it installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port)
    server = HttpServer(proc, port)
    yield server
    server.stop()
