"""The embedded sandbox: what serves when no config file is given.

A throwaway PostgreSQL cluster under the working directory (``.dr_sandbox/``) with the SoundHash
tables and sample data, a local backup location beside it, and an age key pair made on first use,
so `dagster dev` and `dr-pipelines demo` show a working system on a fresh machine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dr_pipelines.core.cluster import LocalCluster, chown_to_postgres, postgres_can_reach
from dr_pipelines.core.config import DrConfig, parse_config

SANDBOX_DIR_ENV = "DR_PIPELINES_SANDBOX_DIR"
SANDBOX_PORT_ENV = "DR_PIPELINES_SANDBOX_PORT"
DEFAULT_PORT = 54329
DATABASE = "soundhash"


def sandbox_dir() -> Path:
    return Path(os.environ.get(SANDBOX_DIR_ENV) or Path.cwd() / ".dr_sandbox").resolve()


def sandbox_port() -> int:
    return int(os.environ.get(SANDBOX_PORT_ENV) or DEFAULT_PORT)


def _cluster_dir(base: Path) -> Path:
    """The cluster lives in the sandbox unless the postgres user cannot reach it (e.g. under
    /root); then under /var/tmp, named after the sandbox so two checkouts don't collide."""
    base.mkdir(parents=True, exist_ok=True)
    if postgres_can_reach(base):
        return base / "pgdata"
    tag = hashlib.sha256(str(base).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"dr-pipelines-sandbox-{tag}" / "pgdata"


def _identity_file(base: Path) -> Path:
    return base / "age-identity.txt"


def _ensure_age_key(base: Path) -> str:
    """The sandbox's age key pair: the identity stays in a 0600 file, the config names the recipient."""
    import pyrage

    path = _identity_file(base)
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        ident = pyrage.x25519.Identity.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# public key: {ident.to_public()}\n{ident}\n")
    for line in path.read_text().splitlines():
        if line.startswith("# public key: "):
            return line.removeprefix("# public key: ").strip()
    raise RuntimeError(f"{path} has no '# public key:' line; delete it to make a new sandbox key")


def sandbox_config() -> DrConfig:
    base = sandbox_dir()
    recipient = _ensure_age_key(base)
    data = {
        "databases": {
            DATABASE: {
                "host": "127.0.0.1",
                "port": sandbox_port(),
                "user": "postgres",
                "dbname": DATABASE,
                "objectives": {"rpo": "6h", "rto": "1h"},
                "pgdata": str(_cluster_dir(base)),
            }
        },
        "locations": {"local": {"type": "local", "path": str(base / "backups")}},
        "encryption": {"method": "age", "recipients": [recipient], "identity_file": str(_identity_file(base))},
        "compression": {"method": "zstd", "level": 3},
        "schedules": {"running": False},
    }
    return parse_config(data, source="the embedded sandbox", base_dir=base, sandbox=True)


SAMPLE_SCHEMA = """
CREATE TABLE channels (
    id serial PRIMARY KEY,
    channel_id text NOT NULL UNIQUE,
    channel_name text NOT NULL,
    description text,
    subscriber_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE videos (
    id serial PRIMARY KEY,
    video_id text NOT NULL UNIQUE,
    channel_id integer NOT NULL REFERENCES channels(id),
    title text NOT NULL,
    duration_s real,
    upload_date date,
    processed boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE fingerprints (
    id bigserial PRIMARY KEY,
    video_id integer NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    start_time real NOT NULL,
    end_time real NOT NULL,
    fingerprint_data bytea NOT NULL,
    confidence_score real,
    peak_count integer
);
CREATE INDEX fingerprints_video_idx ON fingerprints (video_id);
CREATE TABLE processing_jobs (
    id serial PRIMARY KEY,
    job_type text NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    target_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);
INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6');
"""

SAMPLE_DATA = [
    """
INSERT INTO channels (channel_id, channel_name, description, subscriber_count)
SELECT 'UC' || md5(g::text), 'Channel ' || g, 'Sample channel ' || g || ' – ünïcödé', g * 137
FROM generate_series(1, %(channels)s) g""",
    """
INSERT INTO videos (video_id, channel_id, title, duration_s, upload_date, processed)
SELECT substr(md5('v' || g), 1, 11), 1 + g %% %(channels)s, 'Video ' || g, 60 + g %% 600,
       date '2024-01-01' + (g %% 700), g %% 3 = 0
FROM generate_series(1, %(videos)s) g""",
    """
INSERT INTO fingerprints (video_id, start_time, end_time, fingerprint_data, confidence_score, peak_count)
SELECT 1 + g %% %(videos)s, (g %% 90) * 10, (g %% 90) * 10 + 10,
       decode(md5(g::text) || md5((g * 7)::text), 'hex'), (g %% 100) / 100.0, g %% 50
FROM generate_series(1, %(fingerprints)s) g""",
    """
INSERT INTO processing_jobs (job_type, status, target_id)
SELECT 'fingerprint', (ARRAY['pending','running','completed','failed'])[1 + g %% 4], 'v' || g
FROM generate_series(1, %(jobs)s) g""",
]
SAMPLE_SIZES = {"channels": 50, "videos": 2000, "fingerprints": 50000, "jobs": 500}


def sandbox_cluster(config: DrConfig | None = None) -> LocalCluster:
    config = config or sandbox_config()
    db = config.databases[DATABASE]
    return LocalCluster(Path(db.pgdata), db.port)


def ensure_sandbox_running(config: DrConfig | None = None, log=print) -> LocalCluster:
    """Create (first time) and start the sandbox cluster; idempotent."""
    import psycopg

    cluster = sandbox_cluster(config)
    ready = cluster.data_dir.parent / ".sandbox-ready"
    if not ready.exists():
        if cluster.data_dir.exists():  # a creation that was interrupted: start over
            cluster.remove()
        log(f"creating the sandbox PostgreSQL cluster in {cluster.data_dir} (port {cluster.port})")
        cluster.data_dir.parent.mkdir(parents=True, exist_ok=True)
        chown_to_postgres(cluster.data_dir.parent)
        cluster.initdb({"fsync": "off", "shared_buffers": "'128MB'", **archive_settings(config or sandbox_config(), log)})
        cluster.start()
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname=DATABASE) as conn:
            conn.execute(SAMPLE_SCHEMA)
            for statement in SAMPLE_DATA:
                conn.execute(statement, SAMPLE_SIZES)
        ready.touch()
        log("sandbox database 'soundhash' loaded with sample channels, videos and fingerprints")
    elif not cluster.is_running():
        log(f"starting the sandbox PostgreSQL cluster in {cluster.data_dir} (port {cluster.port})")
        cluster.start()
    return cluster


def sandbox_config_file(config: DrConfig) -> Path:
    """The sandbox's config as a file PostgreSQL's archive_command and restore_command (run as the
    postgres user) can read; the same settings the embedded sandbox uses."""
    import yaml

    base = sandbox_dir()
    path = base / "sandbox.yaml"
    data = config.model_dump(mode="json", exclude={"base_dir", "sandbox"}, exclude_defaults=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    path.chmod(0o644)
    return path


def archive_settings(config: DrConfig, log=print) -> dict[str, str]:
    """WAL archiving through our command, when the postgres user can run it and reach the sandbox;
    otherwise none (the demo then skips point-in-time recovery and says why)."""
    import sys

    from dr_pipelines.core.wal import postgresql_conf_lines, wal_prefix

    base = sandbox_dir()
    location = Path(config.locations["local"].path)
    exe = Path(sys.executable).parent / "dr-pipelines"
    if not (postgres_can_reach(base) and postgres_can_reach(exe.parent)):
        log(f"note: the postgres user cannot reach {base} or {exe.parent}; the sandbox will not archive WAL "
            "(point-in-time recovery is skipped)")
        return {}
    wal_dir = location / wal_prefix(DATABASE)
    wal_dir.mkdir(parents=True, exist_ok=True)
    for p in (location, location / DATABASE, wal_dir):
        chown_to_postgres(p)
    identity = _identity_file(base)
    chown_to_postgres(identity)  # restore_command decrypts WAL as the postgres user (root still reads it)
    lines = postgresql_conf_lines(config, DATABASE, str(sandbox_config_file(config)))
    return dict(ln.split(" = ", 1) for ln in lines if not ln.startswith("#"))
