"""What each child process is given of our environment: only what it needs.

Our own environment holds secrets (the database password, cloud keys). pg_dump and pg_restore
get the libpq variables; age, zstd and tar get none of them; a cluster we start (the sandbox, a
PITR) gets what its archive_command / restore_command needs to reach the locations, and never a
database password. A secret a child does not hold cannot leak through it (its environment is
readable in /proc by its owner, and lands in core dumps and crash reports).
"""

from __future__ import annotations

import os

from dr_pipelines.core.config import DatabaseConfig, DrConfig

_BASE = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "LD_LIBRARY_PATH")
# how our commands reach the locations when a cluster runs them (boto3's and google-auth's own
# chains, proxies, CA bundles)
_CLOUD_PREFIXES = (
    "AWS_",
    "GOOGLE_",
    "CLOUDSDK_",
    "STORAGE_EMULATOR_HOST",
    "DR_PIPELINES_",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_",
    "REQUESTS_CA_BUNDLE",
)


def tool_env() -> dict[str, str]:
    """For age, zstd, gzip, tar: no secret at all."""
    return {k: v for k, v in os.environ.items() if k in _BASE or k.startswith("LC_")}


def libpq_env(db: DatabaseConfig, name: str) -> dict[str, str]:
    """For pg_dump, pg_restore, pg_basebackup, psql: the connection settings (the password too,
    in PGPASSWORD: never in argv), and nothing of the cloud."""
    return {**tool_env(), **db.libpq_env(name)}


def server_env(config: DrConfig | None = None) -> dict[str, str]:
    """For a PostgreSQL server we start: what its archive_command and restore_command (our
    command) need to reach the locations and decrypt, and no database password."""
    env = tool_env()
    env.update({k: v for k, v in os.environ.items() if k.startswith(_CLOUD_PREFIXES)})
    if config is not None:
        wanted = {config.encryption.identity_file_env}
        for loc in config.locations.values():
            wanted |= {getattr(loc, "access_key_id_env", None), getattr(loc, "secret_access_key_env", None)}
        env.update({k: os.environ[k] for k in wanted if k and k in os.environ})
        for db in config.databases.values():  # even if named like a cloud variable
            for var in (db.password_env, db.restore_test.password_env):
                env.pop(var or "", None)
    return env
