"""A real PostgreSQL 15 cluster for a test, run as the postgres OS user."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import LiteralString, cast

import psycopg
from psycopg import sql

from dr_pipelines.core.postgres.cluster import LocalCluster
from dr_pipelines.sandbox.sample_data import SAMPLE_DATA, SAMPLE_SCHEMA, SAMPLE_SIZES


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
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if sample_data:
            with self.connect(
                name,
            ) as conn:
                conn.execute(SAMPLE_SCHEMA)
                for statement in SAMPLE_DATA:
                    # constant SQL, typed list[str] where it is defined; psycopg wants a LiteralString
                    conn.execute(cast(LiteralString, statement), SAMPLE_SIZES)

    def row_counts(self, dbname: str) -> dict[str, int]:
        from dr_pipelines.core.postgres.client import table_row_counts

        with self.connect(dbname) as conn:
            return table_row_counts(conn)

    def table_checksums(self, dbname: str) -> dict[str, str]:
        """md5 of every user table's rows in a stable order: compares content, not just counts."""
        with self.connect(dbname) as conn:
            tables = conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
            ).fetchall()
            return {
                t: conn.execute(
                    sql.SQL("SELECT md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) FROM {} x").format(
                        sql.SQL(t)  # already quoted by format('%I.%I')
                    )
                ).fetchone()[0]
                for (t,) in tables
            }
