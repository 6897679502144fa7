"""A cluster that archives WAL through our command into a location the postgres user can write."""

import shutil
import time

import pyrage
import yaml

from dr_pipelines.core.postgres.cluster import chown_to_postgres
from dr_pipelines.core.wal.pg_config import postgresql_conf_lines
from dr_pipelines_tests.support.configs import config_from
from dr_pipelines_tests.support.processes import reachable_tmpdir, run_cli


class WalSetup:
    """A cluster archiving through our command into a local location the postgres user can write."""

    def __init__(self, server, extra_locations: dict | None = None, encrypted: bool = True):
        self.server = server
        self.root = reachable_tmpdir("drpt-wal-")
        self.repo = self.root / "repo"
        self.repo.mkdir()
        ident = pyrage.x25519.Identity.generate()
        self.identity = self.root / "identity.txt"
        self.identity.write_text(f"{ident}\n")
        self.identity.chmod(0o600)
        # the WAL tree is written by PostgreSQL's archiver (the postgres user), the rest by us (root)
        (self.repo / "app" / "wal").mkdir(parents=True)
        for p in (self.root, self.repo, self.repo / "app", self.repo / "app" / "wal", self.identity):
            chown_to_postgres(p)
        self.config_path = self.root / "dr.yaml"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "databases": {
                        "app": {
                            "host": "127.0.0.1",
                            "port": server.port,
                            "user": "postgres",
                            "dbname": "app",
                            "objectives": {"rpo": "2m"},
                        }
                    },
                    "locations": {"local": {"type": "local", "path": str(self.repo)}, **(extra_locations or {})},
                    "encryption": (
                        {"method": "age", "recipients": [str(ident.to_public())], "identity_file": str(self.identity)}
                        if encrypted
                        else {"method": "none"}
                    ),
                    "wal": {"fetch_retries": 1, "fetch_backoff": "0.1s", "archive_wait": "30s"},
                }
            )
        )
        self.config_path.chmod(0o644)
        self.config = config_from(self.config_path)

    def enable_archiving(self) -> None:
        lines = [
            ln for ln in postgresql_conf_lines(self.config, "app", str(self.config_path)) if not ln.startswith("#")
        ]
        settings = dict(ln.split(" = ", 1) for ln in lines)
        settings["wal_keep_size"] = "'256MB'"  # keep archived segments in pg_wal to compare bytes
        self.server.cluster.write_settings(settings)
        self.server.cluster.stop("fast")
        self.server.cluster.start()

    def switch_and_wait(self, timeout: float = 30) -> str:
        with self.server.connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS t (x int)")
            conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
            # the segment the switch completes (a boundary LSN names the segment before it)
            wal = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                last, failed = conn.execute(
                    "SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver"
                ).fetchone()
                if last and last >= wal:
                    return wal
                time.sleep(0.1)
        raise AssertionError(
            f"{wal} not archived in {timeout}s (last failed: {failed}); "
            f"log: {self.server.cluster.log_file.read_text()[-2000:]}"
        )

    def cli(self, *args):
        return run_cli("--config", str(self.config_path), *args)

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)
