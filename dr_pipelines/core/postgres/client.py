"""PostgreSQL tooling: client binaries, connections, and the facts a manifest records.

Passwords travel in libpq environment variables (PGPASSWORD), never in argv.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from dr_pipelines.core.config import DatabaseConfig
from dr_pipelines.core.errors import DrError

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")


class DatabaseUnreachable(DrError):
    pass


class ToolMissing(DrError):
    pass


def pg_tool(tool: str, db: DatabaseConfig | None = None, server_major: int | None = None) -> str:
    """Path of a PostgreSQL client tool, matching the server's major version when known.

    pg_dump must be at least as new as the server, so Debian's per-version directory comes first.
    """
    candidates: list[Path] = []
    if db is not None and db.pg_bin_dir:
        candidates.append(Path(db.pg_bin_dir))
    if server_major:
        candidates.append(Path(f"/usr/lib/postgresql/{server_major}/bin"))
    candidates.append(DEFAULT_PG_BIN)
    for d in candidates:
        if (d / tool).is_file():
            return str(d / tool)
    found = shutil.which(tool)
    if found:
        return found
    raise ToolMissing(
        f"{tool} not found (looked in {', '.join(map(str, candidates))} and PATH); "
        "install postgresql-client-15 or set pg_bin_dir for the database"
    )


def connect(db: DatabaseConfig, name: str, dbname: str | None = None, **kw: Any) -> psycopg.Connection:
    """Connect, turning libpq's error into one that names the database and what to check."""
    info = db.conninfo(name, dbname)
    try:
        return psycopg.connect(**info, **kw)
    except psycopg.OperationalError as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DatabaseUnreachable(
            f"database {name!r} ({db.user}@{db.host}:{db.port}/{info['dbname']}) is unreachable: "
            f"{detail.rstrip('.')}. Check that the server is running and the host, port, user and password are right."
        ) from None


def server_facts(conn: psycopg.Connection) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int")
        facts["server_version"], num = cur.fetchone() or ("", 0)
        facts["server_major"] = num // 10000
    try:
        with conn.transaction(), conn.cursor() as cur:  # a savepoint, or a transaction in autocommit
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            facts["system_identifier"] = cur.fetchone()[0]
    except psycopg.Error:
        facts["system_identifier"] = None  # not allowed for this role: recorded as unknown
    return facts


def tool_version(path: str) -> str:
    """'pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)' -> '15.18'."""
    from dr_pipelines.core.child_env import tool_env

    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True, env=tool_env()).stdout
    m = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
    return m.group(1) if m else out.strip()


# The user tables whose rows a logical backup carries: ordinary tables and partitions (not the
# partitioned parents, whose count would double them), outside system schemas and extensions, and their size.
_USER_TABLES_SQL = """
SELECT n.nspname, c.relname, pg_table_size(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  AND n.nspname NOT LIKE 'pg_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


def table_rows_and_bytes(conn: psycopg.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Exact row counts of every user table, and their size on disk with TOAST (what a restore
    weighs to share the tables among its loaders); both keyed "schema.table"."""
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    with conn.cursor() as cur:
        cur.execute(_USER_TABLES_SQL)
        for schema, table, size in cur.fetchall():
            sizes[f"{schema}.{table}"] = size or 0
            cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
            counts[f"{schema}.{table}"] = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        large_objects = cur.fetchone()[0]
    if large_objects:
        counts["pg_catalog.pg_largeobject_metadata"] = large_objects
    return counts, sizes


def table_row_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Exact row counts of every user table, keyed "schema.table"."""
    return table_rows_and_bytes(conn)[0]


# One text line per schema object, independent of OIDs, so a restored database yields the same
# fingerprint as its source. search_path is emptied so every name prints schema-qualified.
_SCHEMA_LINES_SQL = """
WITH user_ns AS (
  SELECT oid, nspname FROM pg_namespace
  WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg_toast%'
    AND nspname NOT LIKE 'pg_temp%'
), ext_objs AS (
  SELECT objid FROM pg_depend WHERE deptype = 'e'
)
SELECT line FROM (
  SELECT 'schema ' || nspname AS line FROM user_ns
  UNION ALL
  SELECT 'extension ' || extname FROM pg_extension WHERE extname <> 'plpgsql'
  UNION ALL
  SELECT format('column %s.%s %s %s %s notnull=%s default=%s generated=%s identity=%s',
                n.nspname, c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod),
                a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attgenerated, a.attidentity)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN user_ns n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
  WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
    AND c.oid NOT IN (SELECT objid FROM ext_objs)
  UNION ALL
  SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(co.oid))
  FROM pg_constraint co JOIN user_ns n ON n.oid = co.connamespace
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN user_ns n ON n.oid = c.relnamespace
  WHERE c.oid NOT IN (SELECT objid FROM ext_objs)
  UNION ALL
  SELECT format('view %s.%s %s', n.nspname, c.relname, pg_get_viewdef(c.oid))
  FROM pg_class c JOIN user_ns n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')
  UNION ALL
  SELECT format('function %s.%s(%s) %s', n.nspname, p.proname,
                pg_get_function_identity_arguments(p.oid), md5(coalesce(p.prosrc, '')))
  FROM pg_proc p JOIN user_ns n ON n.oid = p.pronamespace WHERE p.oid NOT IN (SELECT objid FROM ext_objs)
  UNION ALL
  SELECT format('type %s.%s %s %s', n.nspname, t.typname, t.typtype,
                (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e
                 WHERE e.enumtypid = t.oid))
  FROM pg_type t JOIN user_ns n ON n.oid = t.typnamespace
  WHERE t.typtype IN ('e', 'd', 'r') AND t.oid NOT IN (SELECT objid FROM ext_objs)
  UNION ALL
  SELECT 'trigger ' || pg_get_triggerdef(tg.oid)
  FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN user_ns n ON n.oid = c.relnamespace
  WHERE NOT tg.tgisinternal
  UNION ALL
  SELECT format('sequence %s.%s %s %s %s %s', n.nspname, c.relname, format_type(s.seqtypid, NULL),
                s.seqincrement, s.seqmin, s.seqmax)
  FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN user_ns n ON n.oid = c.relnamespace
) lines
ORDER BY line COLLATE "C"
"""


def schema_lines(conn: psycopg.Connection) -> list[str]:
    # conn.transaction(): SET LOCAL needs a transaction block, which autocommit connections lack
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET LOCAL search_path = ''")
        cur.execute(_SCHEMA_LINES_SQL)
        return [row[0] for row in cur.fetchall()]


def schema_fingerprint(conn: psycopg.Connection) -> str:
    h = hashlib.sha256()
    for line in schema_lines(conn):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


class SnapshotSession:
    """A read-only REPEATABLE READ transaction whose snapshot pg_dump imports (--snapshot), so the
    row counts and schema fingerprint recorded in a manifest describe exactly what was dumped."""

    def __init__(self, db: DatabaseConfig, name: str):
        self.conn = connect(db, name)
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self.snapshot_id: str = self.conn.execute("SELECT pg_export_snapshot()").fetchone()[0]

    def close(self) -> None:
        try:
            self.conn.rollback()
        finally:
            self.conn.close()


def libpq_env(db: DatabaseConfig, name: str) -> dict[str, str]:
    """The environment for a client tool: the connection settings (password included) and no other
    secret of ours (see core.child_env)."""
    from dr_pipelines.core.child_env import libpq_env as child_libpq_env

    return child_libpq_env(db, name)
