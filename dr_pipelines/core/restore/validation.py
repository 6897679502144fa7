"""Validation of a restored database: what the manifest recorded, and the database's own checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import LiteralString, cast

import psycopg
from psycopg import sql

from dr_pipelines.core.config import ValidationConfig
from dr_pipelines.core.postgres.client import schema_fingerprint, table_row_counts
from dr_pipelines.core.repository.manifest import Manifest


@dataclass
class TableDiff:
    table: str
    expected: int | None
    actual: int | None


@dataclass
class ValidationResult:
    passed: bool = True
    tables: int = 0
    rows: int = 0
    table_diffs: list[TableDiff] = field(default_factory=list)
    schema_matches: bool | None = None
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok" or what failed
    migrations_version: str | None = None

    def fail(self, check: str, why: str) -> None:
        self.passed = False
        self.checks[check] = why

    def ok(self, check: str) -> None:
        self.checks.setdefault(check, "ok")

    def summary(self) -> str:
        if self.passed:
            return f"validation passed: {self.tables} tables, {self.rows} rows, {len(self.checks)} checks"
        lines = [f"{k}: {v}" for k, v in self.checks.items() if v != "ok"]
        if self.table_diffs:
            lines.append("row counts differ from the manifest:\n" + diff_table(self.table_diffs))
        return "validation FAILED: " + "; ".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def diff_table(diffs: list[TableDiff]) -> str:
    rows = ["| table | manifest | restored |", "|---|---:|---:|"]
    rows += [
        f"| {d.table} | {'missing' if d.expected is None else d.expected} | "
        f"{'missing' if d.actual is None else d.actual} |"
        for d in diffs
    ]
    return "\n".join(rows)


def _qualified(name: str) -> tuple[str, str]:
    schema, _, table = name.rpartition(".")
    return schema or "public", table


def validate_database(
    conn: psycopg.Connection,
    manifest: Manifest | None,
    checks: ValidationConfig,
    *,
    compare_rows: bool = True,
    compare_schema: bool = True,
    run_amcheck: bool = True,
) -> ValidationResult:
    result = ValidationResult()
    counts = table_row_counts(conn)
    result.tables = len(counts)
    result.rows = sum(counts.values())

    if manifest is not None and compare_rows:
        for table in sorted(set(manifest.tables) | set(counts)):
            expected, actual = manifest.tables.get(table), counts.get(table)
            if expected != actual:
                result.table_diffs.append(TableDiff(table, expected, actual))
        if result.table_diffs:
            result.fail("row_counts", f"{len(result.table_diffs)} tables differ from the manifest")
        else:
            result.ok("row_counts")
    if manifest is not None and compare_schema and manifest.schema_fingerprint:
        result.schema_matches = schema_fingerprint(conn) == manifest.schema_fingerprint
        if result.schema_matches:
            result.ok("schema_fingerprint")
        else:
            result.fail("schema_fingerprint", "the restored schema differs from the one recorded at backup time")

    for name in checks.required_tables:
        schema, table = _qualified(name)
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, table).as_string(conn),)
        ).fetchone()[0]
        if found:
            result.ok(f"table {name}")
        else:
            result.fail(f"table {name}", "missing")

    for name, query in checks.zero_row_queries.items():
        try:
            with conn.transaction():  # the operator's own query, from the config
                n = conn.execute(
                    sql.SQL("SELECT count(*) FROM ({}) AS q").format(sql.SQL(cast(LiteralString, query)))
                ).fetchone()[0]
        except psycopg.Error as e:
            result.fail(f"query {name}", f"error: {str(e).strip().splitlines()[0]}")
            continue
        if n:
            result.fail(f"query {name}", f"returned {n} rows, expected none")
        else:
            result.ok(f"query {name}")

    if checks.migrations:
        m = checks.migrations
        schema, table = _qualified(m.table)
        try:
            with conn.transaction():
                row = conn.execute(
                    sql.SQL("SELECT {}::text FROM {} ORDER BY 1 DESC LIMIT 1").format(
                        sql.Identifier(m.column), sql.Identifier(schema, table)
                    )
                ).fetchone()
            result.migrations_version = row[0] if row else None
            if m.expected is not None and result.migrations_version != m.expected:
                result.fail("migrations", f"version {result.migrations_version}, expected {m.expected}")
            elif result.migrations_version is None:
                result.fail("migrations", f"{m.table} is empty")
            else:
                result.ok("migrations")
        except psycopg.Error as e:
            result.fail("migrations", f"cannot read {m.table}.{m.column}: {str(e).strip().splitlines()[0]}")

    if checks.amcheck and run_amcheck:
        _amcheck(conn, result)
    return result


def _amcheck(conn: psycopg.Connection, result: ValidationResult) -> None:
    """bt_index_check on every B-tree index; the extension is removed again if we added it."""
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()
    if not available:
        result.checks["amcheck"] = "skipped: extension not available on this server"
        return
    installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone()
    try:
        if not installed:
            conn.execute("CREATE EXTENSION amcheck")
        indexes = conn.execute(
            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am am ON am.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE am.amname = 'btree' AND c.relkind = 'i' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND i.indisvalid"
        ).fetchall()
        bad = []
        for (index,) in indexes:
            try:
                with conn.transaction():
                    conn.execute("SELECT bt_index_check(%s::regclass)", (index,))
            except psycopg.Error as e:
                bad.append(f"{index}: {str(e).strip().splitlines()[0]}")
        if bad:
            result.fail("amcheck", "; ".join(bad))
        else:
            result.checks["amcheck"] = f"ok ({len(indexes)} indexes)"
    finally:
        if not installed:
            conn.execute("DROP EXTENSION IF EXISTS amcheck")
