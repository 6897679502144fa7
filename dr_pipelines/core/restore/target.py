"""Where a restore goes: the target's plan (confirmed before anything is touched), staging, swap."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from dr_pipelines.core.config import ConfigError, DatabaseConfig, DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import connect
from dr_pipelines.core.restore.request import (
    NAME_MAX,
    RestoreError,
    RestoreRequest,
    UnsafeRestore,
)
from dr_pipelines.core.sweep import keep_database

# --------------------------------------------------------------------------- databases


def _db_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _user_object_count(server: DatabaseConfig, db_name: str, dbname: str) -> int:
    with connect(server, db_name, dbname=dbname, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
            "AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
        ).fetchone()[0]


def _terminate(conn: psycopg.Connection, dbname: str) -> None:
    """End every session on `dbname`, waiting (up to 10 s each) until they are gone: a terminated
    backend that has not exited yet still blocks ALTER DATABASE ... RENAME."""
    conn.execute(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )


def drop_database(server: DatabaseConfig, db_name: str, dbname: str) -> None:
    with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def staging_name(target: str) -> str:
    return f"{target[: NAME_MAX - 19]}__restoring_{secrets.token_hex(3)}"


@dataclass
class TargetPlan:
    """Where the restore goes, decided (and confirmed) before anything is touched."""

    target: str
    exists: bool
    staging: str | None  # None: data_only restores straight into the existing target
    is_source: bool


def plan_target(config: DrConfig, request: RestoreRequest, server: DatabaseConfig | None = None) -> TargetPlan:
    request.check()
    db = config.database(request.database)
    server = server or db
    target = request.target or db.dbname
    if len(target) > NAME_MAX:
        raise ConfigError(f"target database name {target!r} is longer than {NAME_MAX} characters")
    is_source = target == db.dbname and server.host == db.host and server.port == db.port
    with connect(server, request.database, dbname="postgres", autocommit=True) as conn:
        exists = _db_exists(conn, target)
    confirmed = request.clean and request.confirm == target
    if request.data_only:
        if not exists:
            raise ConfigError(f"data_only restores into an existing schema, but database {target!r} does not exist")
        if not confirmed:
            raise UnsafeRestore(
                f"data_only loads rows into the existing database {target!r}: set clean: true and "
                f"confirm: {target!r} (shell: --clean --yes) to go ahead"
            )
        return TargetPlan(target, True, None, is_source)
    # a database that does not exist yet (a new server) or holds nothing is simply created or filled;
    # only one holding objects needs the confirmation
    if is_source and exists and not confirmed and _user_object_count(server, request.database, target):
        raise UnsafeRestore(
            f"{target!r} is the source database {request.database!r} itself: restoring over it needs clean: true "
            f"and confirm: {target!r} (shell: --clean --yes); or restore elsewhere: target_database (shell: --into). Nothing was touched."
        )
    if exists and not confirmed and _user_object_count(server, request.database, target):
        raise UnsafeRestore(
            f"database {target!r} exists and is not empty: set clean: true and confirm: {target!r} "
            f"(shell: --clean --yes) to replace it (the old one is kept, renamed), or choose another target. "
            "Nothing was touched."
        )
    return TargetPlan(target, exists, staging_name(target), is_source)


def swap_in(server: DatabaseConfig, db_name: str, plan: TargetPlan, keep_previous: bool, log: Log) -> str | None:
    """Put the validated staging database in the target's place; returns the kept previous name."""
    previous = None
    stamp = f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}_{secrets.token_hex(2)}"
    with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
        try:
            if plan.exists:
                previous = f"{plan.target[: NAME_MAX - 33]}__pre_restore_{stamp}"
                _terminate(conn, plan.target)
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(plan.target), sql.Identifier(previous)
                    )
                )
            assert plan.staging is not None  # only a data_only restore has none, and it never swaps
            _terminate(conn, plan.staging)
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(plan.staging), sql.Identifier(plan.target)
                )
            )
            keep_database(conn, plan.target)  # swapped in: no longer a staging database to sweep
        except psycopg.Error as e:
            if plan.staging and _db_exists(conn, plan.staging):
                keep_database(conn, plan.staging)  # the validated restore waits for a person: never swept
            where = (
                f"the old database is now {previous!r}"
                if previous and _db_exists(conn, previous)
                else f"{plan.target!r} is unchanged"
            )
            raise RestoreError(
                f"could not swap the restored database into place ({str(e).strip()}); the validated "
                f"restore is in {plan.staging!r} and {where}. Rename by hand or run the restore again."
            ) from None
        if previous and not keep_previous:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(previous)))
            previous = None
    log(
        f"database {plan.target!r} now holds the restored data"
        + (f"; the previous one is kept as {previous!r}" if previous else "")
    )
    return previous
