"""Fixtures that start real servers on 127.0.0.1: PostgreSQL 15 clusters (as the postgres OS user),
moto's S3 server and the GCS emulator. Reset between tests, always torn down."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pyrage
import pytest
import yaml

from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, free_port
from dr_pipelines.core.storage.base import forget_down
from dr_pipelines_tests.support.configs import BUCKET, AgeKey, gcs_location, local_location, s3_location
from dr_pipelines_tests.support.postgres import PgServer
from dr_pipelines_tests.support.processes import REACHABLE_DIRS, reachable_tmpdir, wait_for_port
from dr_pipelines_tests.support.servers import AlertReceiver, HttpServer, start_gcs_emulator, start_moto


@pytest.fixture(scope="session", autouse=True)
def _remove_reachable_dirs() -> Iterator[None]:
    yield
    for d in REACHABLE_DIRS:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Path]:
    """One initdb per session; every cluster is a copy (much faster than initdb each time)."""
    root = reachable_tmpdir("drpt-template-")
    chown_to_postgres(root)
    cluster = LocalCluster(root / "data", port=0)
    cluster.initdb(
        {
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            "shared_buffers": "'64MB'",
            "max_wal_senders": "4",
            "wal_level": "replica",
        },
        wal_segsize_mb=1,
    )
    yield cluster.data_dir
    shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture(autouse=True)
def _locations_up() -> Iterator[None]:
    """Each test starts with no location known down (as each run does)."""
    forget_down()
    yield


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

    def write(
        pg: PgServer, locations: dict, encryption: dict | None = None, dbname: str = "app", name: str = "app", **extra
    ) -> Path:
        data = {
            "databases": {
                name: {
                    "host": "127.0.0.1",
                    "port": pg.port,
                    "user": "postgres",
                    "dbname": dbname,
                    **extra.pop("database", {}),
                }
            },
            "locations": locations,
            "encryption": encryption or {"method": "none"},
            **extra,
        }
        path = tmp_path / "dr.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def three_locations(tmp_path, s3, gcs) -> dict:
    return {"local": local_location(tmp_path / "backups"), "s3": s3_location(s3), "gcs": gcs_location()}


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
    proc = subprocess.Popen(
        [exe, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    server = HttpServer(proc, port)
    yield server
    server.stop()


@pytest.fixture
def restored_dirs() -> Iterator[Callable[[], Path]]:
    """Fresh data directories, reachable by the postgres user, for recovered clusters; each one's
    cluster is stopped and its files removed at the end."""
    made: list[Path] = []

    def make() -> Path:
        root = reachable_tmpdir("drpt-restored-")
        made.append(root)
        return root / "data"

    yield make
    for root in made:
        LocalCluster(root / "data", 0).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
