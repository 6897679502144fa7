"""The embedded sandbox: what serves when no config file is given.

A throwaway PostgreSQL cluster under the working directory (``.dr_sandbox/``) with the SoundHash
tables and sample data, a local backup location beside it, and an age key pair made on first use,
so `dagster dev` and `dr-pipelines demo` show a working system on a fresh machine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dr_pipelines.core.child_env import server_env
from dr_pipelines.core.config import CONFIG_ENV, DrConfig, LocalLocationConfig, load_config, parse_config
from dr_pipelines.core.durable import write_atomically
from dr_pipelines.core.postgres.cluster import (
    LocalCluster,
    chown_to_postgres,
    postgres_can_reach,
)
from dr_pipelines.sandbox.sample_data import SAMPLE_DATA, SAMPLE_SCHEMA, SAMPLE_SIZES
from dr_pipelines.sandbox.sample_files import app_files_dir, ensure_sample_files, secrets_dir

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


def _services(base: Path, port: int) -> dict:
    """SoundHash's application as the recovery starts it: the API (serving its files) once the database
    and the files are back, then the frontend after the API; each answers HTTP when healthy. Only the
    full_system_recovery job starts them (never the drill), on ports beside the sandbox's."""
    import sys

    out = {}
    for offset, (name, after, serves) in enumerate(
        (("api", [], app_files_dir(base)), ("frontend", ["api"], app_files_dir(base) / "config")), start=1
    ):
        pidfile = base / f"{name}.pid"
        serve = f"{sys.executable} -m http.server {port + offset} --bind 127.0.0.1 --directory {serves}"
        out[name] = {
            "start": [{"command": ["sh", "-c", f"nohup {serve} >/dev/null 2>&1 & echo $! > {pidfile}"]}],
            "stop": [
                {"command": ["sh", "-c", f"[ -f {pidfile} ] && kill $(cat {pidfile}) 2>/dev/null; rm -f {pidfile}"]}
            ],
            "health_checks": [{"url": f"http://127.0.0.1:{port + offset}/"}],
            "health_retries": 20,
            "health_interval": "0.5s",
            "after": after,
            **({"databases": [DATABASE], "file_sets": ["app", "secrets"]} if name == "api" else {}),
        }
    return out


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
        "files": {"state_dir": str(base / "files_state")},
        "file_sets": {
            "app": {
                "paths": [str(app_files_dir(base))],
                "exclude": ["*.log"],
                "exclude_caches": True,
                "objectives": {"rpo": "8h"},
            },
            "secrets": {"paths": [str(secrets_dir(base))], "secrets": True, "objectives": {"rpo": "8h"}},
        },
        "services": _services(base, sandbox_port()),
        # the drill's PITR clusters need a directory the postgres user reaches (like the sandbox cluster's)
        "recovery": {
            "drill_dir": str(_cluster_dir(base).parent / "drills"),
            "quarantine_dir": str(base / "quarantine"),
            "rto": "1h",
            "rpo": "8h",
        },
    }
    return parse_config(data, source="the embedded sandbox", base_dir=base, sandbox=True)


def sandbox_cluster(config: DrConfig | None = None) -> LocalCluster:
    config = config or sandbox_config()
    db = config.databases[DATABASE]
    assert db.pgdata is not None  # the sandbox always says where its cluster lives
    return LocalCluster(Path(db.pgdata), db.port)


def ensure_sandbox_running(config: DrConfig | None = None, log=print) -> LocalCluster:
    """Create (first time) and start the sandbox cluster; idempotent."""
    import psycopg

    cluster = sandbox_cluster(config)
    ensure_sample_files(config.base_dir if config is not None else sandbox_dir())
    ready = cluster.data_dir.parent / ".sandbox-ready"
    if not ready.exists():
        if cluster.data_dir.exists():  # a creation that was interrupted: start over
            cluster.remove()
        log(f"creating the sandbox PostgreSQL cluster in {cluster.data_dir} (port {cluster.port})")
        cluster.data_dir.parent.mkdir(parents=True, exist_ok=True)
        chown_to_postgres(cluster.data_dir.parent)
        cluster.initdb(
            {"fsync": "off", "shared_buffers": "'128MB'", **archive_settings(config or sandbox_config(), log)}
        )
        cluster.start(env=server_env(config or sandbox_config()))
        with psycopg.connect(
            host="127.0.0.1", port=cluster.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname=DATABASE) as conn:
            conn.execute(SAMPLE_SCHEMA)
            for statement in SAMPLE_DATA:
                conn.execute(statement, SAMPLE_SIZES)
        ready.touch()
        log("sandbox database 'soundhash' loaded with sample channels, videos and fingerprints")
    elif not cluster.is_running():
        log(f"starting the sandbox PostgreSQL cluster in {cluster.data_dir} (port {cluster.port})")
        cluster.start(env=server_env(config or sandbox_config()))
    return cluster


def config_and_file(path: str | os.PathLike | None = None) -> tuple[DrConfig, str]:
    """``--config FILE``, else ``$DR_PIPELINES_CONFIG``, else the embedded sandbox; with the absolute
    path of the file it is read from. The sandbox writes its config to a file too, so that every
    command PostgreSQL runs for us (archive_command, restore_command) names it explicitly: run from
    a data directory, a command without ``--config`` would build an empty sandbox of its own."""
    path = path or os.environ.get(CONFIG_ENV) or None
    if path is not None:
        return load_config(path), str(Path(path).resolve())
    config = sandbox_config()
    return config, str(sandbox_config_file(config))


def sandbox_config_file(config: DrConfig) -> Path:
    """The sandbox's config as a file PostgreSQL's archive_command and restore_command (run as the
    postgres user) can read; the same settings the embedded sandbox uses."""
    import yaml

    base = sandbox_dir()
    path = base / "sandbox.yaml"
    data = config.model_dump(mode="json", exclude={"base_dir", "sandbox"}, exclude_defaults=True)
    text = yaml.safe_dump(data, sort_keys=False).encode()
    if not path.exists() or path.read_bytes() != text:  # the code server and the shell read it concurrently
        write_atomically(path, text)
        path.chmod(0o644)
    return path


def archive_settings(config: DrConfig, log=print) -> dict[str, str]:
    """WAL archiving through our command, when the postgres user can run it and reach the sandbox;
    otherwise none (the demo then skips point-in-time recovery and says why)."""
    import sys

    from dr_pipelines.core.wal.archive import wal_prefix
    from dr_pipelines.core.wal.pg_config import postgresql_conf_lines

    base = sandbox_dir()
    local = config.locations["local"]
    assert isinstance(local, LocalLocationConfig)
    location = Path(local.path)
    exe = Path(sys.executable).parent / "dr-pipelines"
    if not (postgres_can_reach(base) and postgres_can_reach(exe.parent)):
        log(
            f"note: the postgres user cannot reach {base} or {exe.parent}; the sandbox will not archive WAL "
            "(point-in-time recovery is skipped)"
        )
        return {}
    wal_dir = location / wal_prefix(DATABASE)
    wal_dir.mkdir(parents=True, exist_ok=True)
    for p in (location, location / DATABASE, wal_dir):
        chown_to_postgres(p)
    identity = _identity_file(base)
    chown_to_postgres(identity)  # restore_command decrypts WAL as the postgres user (root still reads it)
    lines = postgresql_conf_lines(config, DATABASE, str(sandbox_config_file(config)))
    return dict(ln.split(" = ", 1) for ln in lines if not ln.startswith("#"))
