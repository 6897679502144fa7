"""Whole-system recovery as an operator runs it (`dr-pipelines recover ...`, which launches the jobs the
Launchpad launches), against a real cluster archiving WAL, real file snapshots and real services
(small HTTP servers started by the configured commands). Restored data is compared with the source."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import LiteralString

import psycopg
import pytest
import yaml

from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
from dr_pipelines_tests.integration.test_files import make_tree, restored_root, tree_facts
from dr_pipelines_tests.support.processes import VENV_BIN
from dr_pipelines_tests.support.wal import WalSetup


def _service(root: Path, name: str, healthy: bool = True) -> dict:
    """A service the way a runbook's would be: a start command that backgrounds a server, a stop command,
    an HTTP health check; each start is recorded, so the order can be checked."""
    port = free_port()
    pidfile = root / f"{name}.pid"
    serve = f"{sys.executable} -m http.server {port if healthy else free_port()} --bind 127.0.0.1 --directory {root}"
    return {
        "start": [
            {
                "command": [
                    "sh",
                    "-c",
                    # the recovery says where the data went: the recovered cluster's port, for one
                    f"echo {name}:${{DR_DB_APP_PORT:-unset}} >> {root}/started.log; "
                    f"nohup {serve} >/dev/null 2>&1 & echo $! > {pidfile}",
                ]
            }
        ],
        "stop": [{"command": ["sh", "-c", f"[ -f {pidfile} ] && kill $(cat {pidfile}) || true"]}],
        "health_checks": [{"url": f"http://127.0.0.1:{port}/", "method": "GET", "expect_status": 200}],
        "health_retries": 20,
        "health_interval": "0.25s",
        "timeout": "5s",
    }


class System:
    """A cluster archiving WAL, an application file tree, and two services (api, then frontend)."""

    def __init__(self, server, unhealthy: str | None = None):
        self.wal = WalSetup(server)
        self.root = self.wal.root
        self.tree = self.root / "app_files"
        self.tree.mkdir()
        make_tree(self.tree)
        self.services_dir = self.root / "services"
        self.services_dir.mkdir()
        data = yaml.safe_load(self.wal.config_path.read_text())
        data["databases"]["app"]["pgdata"] = None
        data["file_sets"] = {"app": {"paths": [str(self.tree)]}}
        data["files"] = {"state_dir": str(self.root / "state")}
        data["services"] = {
            "api": {
                **_service(self.services_dir, "api", unhealthy != "api"),
                "databases": ["app"],
                "file_sets": ["app"],
            },
            "frontend": {**_service(self.services_dir, "frontend", unhealthy != "frontend"), "after": ["api"]},
        }
        data["recovery"] = {
            "drill_dir": str(self.root / "drills"),
            "quarantine_dir": str(self.root / "quarantine"),
            "incident_margin": "1s",
        }
        self.wal.config_path.write_text(yaml.safe_dump(data))
        self.wal.enable_archiving()

    @property
    def config(self) -> str:
        return str(self.wal.config_path)

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        from dr_pipelines_tests.support.processes import run_cli

        return run_cli("--config", self.config, *args, env=env, timeout=600)

    def backed_up(self) -> None:
        assert self.cli("backup", "app", "--kind", "base").returncode == 0
        assert self.cli("snapshot", "app").returncode == 0
        with self.wal.server.connect("app") as conn:
            conn.execute("CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 20000) g")
        self.wal.switch_and_wait(timeout=60)

    def started(self) -> list[str]:
        log = self.services_dir / "started.log"
        return [line.split(":")[0] for line in log.read_text().split()] if log.exists() else []

    def ports_seen(self) -> set[str]:
        return {line.split(":")[1] for line in (self.services_dir / "started.log").read_text().split()}

    def stop_services(self) -> None:
        for pidfile in self.services_dir.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass

    def cleanup(self, *roots: Path) -> None:
        self.stop_services()
        for root in roots:
            for data_dir in (root / "postgres").glob("*"):
                LocalCluster(data_dir, 0).stop("immediate")
        self.wal.cleanup()


@pytest.fixture
def system(pg):
    made: list[System] = []
    roots: list[Path] = []

    def make(**kw) -> System:
        made.append(System(pg, **kw))
        return made[-1]

    make.roots = roots
    yield make
    for s in made:
        s.cleanup(*roots)


def _rows(port: int, sql: LiteralString):
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="app", autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def test_full_system_recovery_rebuilds_databases_files_and_services_in_order(system, pg):
    s = system()
    s.backed_up()
    source_orders = _rows(pg.port, "SELECT * FROM orders ORDER BY id")
    target = s.root / "rebuilt"
    system.roots.append(target)

    plan = s.cli("recover", "system", "--into", str(target), "--plan")
    assert plan.returncode == 0, plan.stderr
    assert "database app: base backup" in plan.stdout and "file set app: snapshot" in plan.stdout
    assert "start services in order" in plan.stdout and "api -> frontend" in plan.stdout
    assert not target.exists()  # --plan touches nothing

    r = s.cli("recover", "system", "--into", str(target))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["scenario"] == "full_system_recovery"
    [db] = [c for c in report["components"] if c["kind"] == "database"]
    [files] = [c for c in report["components"] if c["kind"] == "files"]
    assert db["ok"] and db["method"] == "pitr" and files["ok"]
    port = int(db["where"].rsplit(" ", 1)[-1])
    assert _rows(port, "SELECT * FROM orders ORDER BY id") == source_orders  # the WAL after the base backup too
    assert tree_facts(restored_root(target / "files" / "app", s.tree)) == tree_facts(s.tree)
    assert s.started() == ["api", "frontend"]  # dependency order, each after the previous was healthy
    assert s.ports_seen() == {str(port)}  # the services were told where the recovered database runs
    assert [x["name"] for x in report["services"]] == ["api", "frontend"]
    assert all(x["healthy"] for x in report["services"])
    assert report["rto_s"] > 0 and db["data_loss_s"] is not None and "restore" in report["steps_s"]
    assert not (target / ".dr_recovery.json").exists()
    # stored in the repository, where the report and the UI read it
    stored = list((s.wal.repo / "_system" / "reports" / "recovery").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["passed"]

    again = s.cli("recover", "system", "--into", str(target))  # not empty now: refused before any change
    assert again.returncode != 0 and "is not empty" in again.stderr and "nothing was touched" in again.stderr


def test_a_service_that_never_becomes_healthy_stops_the_start_there(system):
    s = system(unhealthy="frontend")
    s.backed_up()
    target = s.root / "rebuilt"
    system.roots.append(target)
    r = s.cli("recover", "system", "--into", str(target), "--method", "logical", "--db", "app")
    assert r.returncode != 0
    assert "no usable logical backup" in r.stderr  # only a base backup exists: said before anything
    assert not target.exists()
    r = s.cli("recover", "system", "--into", str(target))
    assert r.returncode != 0
    assert "service 'frontend' did not start healthy" in r.stderr and "Left running: api" in r.stderr
    assert "dr-pipelines recover services frontend" in r.stderr
    assert s.started() == ["api", "frontend"]
    [stored] = list((s.wal.repo / "_system" / "reports" / "recovery").glob("*.json"))
    record = json.loads(stored.read_text())
    assert not record["passed"] and [x["healthy"] for x in record["services"]] == [True, False]


def test_every_location_down_and_a_wal_gap_are_refused_before_any_change(system, tmp_path):
    s = system()
    s.backed_up()
    target = s.root / "rebuilt"
    system.roots.append(target)
    # a gap: one archived segment (and its sidecar) lost, before the newest
    wal_dir = s.wal.repo / "app" / "wal"
    segments = sorted({p.name.split(".")[0] for p in wal_dir.rglob("*") if len(p.name.split(".")[0]) == 24})
    lost = list(wal_dir.rglob(segments[-2] + "*"))
    for p in lost:
        p.rename(tmp_path / p.name)
    r = s.cli("recover", "system", "--into", str(target), "--no-services")
    assert r.returncode != 0 and "WAL archive has a gap" in r.stderr and "--accept-gaps" in r.stderr
    assert not target.exists()
    r = s.cli("recover", "system", "--into", str(target), "--no-services", "--accept-gaps")
    assert r.returncode == 0, r.stderr
    [db] = [c for c in json.loads(r.stdout)["components"] if c["kind"] == "database"]
    assert db["ok"] and any("gap" in w for w in db["warnings"]), db
    for p in lost:
        (tmp_path / p.name).rename(p)

    # every location down: a config whose only location is an S3 endpoint nothing answers on
    data = yaml.safe_load(Path(s.config).read_text())
    data["locations"] = {
        "s3": {
            "type": "s3",
            "bucket": "gone",
            "endpoint_url": f"http://127.0.0.1:{free_port()}",
            "connect_timeout": "1s",
            "retry_for": "1s",
        }
    }
    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump(data))
    other = s.root / "other"
    from dr_pipelines_tests.support.processes import run_cli

    r = run_cli("--config", str(dead), "recover", "system", "--into", str(other), "--no-services")
    assert r.returncode != 0 and "no location answers" in r.stderr and "s3:" in r.stderr
    assert not other.exists()


def test_a_killed_recovery_is_cleaned_up_by_the_next_one(system):
    s = system()
    s.backed_up()
    target = s.root / "rebuilt"
    system.roots.append(target)
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "dr-pipelines"),
            "--config",
            s.config,
            "recover",
            "system",
            "--into",
            str(target),
            "--no-services",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (target / "postgres" / "app" / "PG_VERSION").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (target / ".dr_recovery.json").exists()  # what it was doing is on disk
    r = s.cli("recover", "system", "--into", str(target), "--no-services")
    assert r.returncode == 0, r.stderr
    assert "was killed midway" in r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and any("killed midway" in n for n in report["notes"])
    [db] = [c for c in report["components"] if c["kind"] == "database"]
    port = int(db["where"].rsplit(" ", 1)[-1])
    assert _rows(port, "SELECT count(*) FROM orders") == [(20000,)]


def test_a_corrupt_snapshot_at_the_point_falls_back_to_the_older_one(system):
    s = system()
    s.backed_up()
    (s.tree / "late.bin").write_bytes(os.urandom(1 << 20))  # the newest snapshot gets a pack of its own
    assert s.cli("snapshot", "app").returncode == 0
    listed = json.loads(s.cli("snapshots", "list", "--json").stdout)["snapshots"]
    newest, older = listed[0]["id"], listed[1]["id"]
    sets = s.wal.repo / "_files" / "sets" / "app"
    own = set(json.loads((sets / newest / "index.json").read_text())["packs"])
    own -= set(json.loads((sets / older / "index.json").read_text())["packs"])
    assert own
    [pack] = [p for p in (s.wal.repo / "_files" / "packs").rglob("*") if p.name.split(".")[0] == sorted(own)[0]]
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    target = s.root / "rebuilt"
    system.roots.append(target)
    r = s.cli("recover", "system", "--into", str(target), "--no-services")
    assert r.returncode == 0, r.stderr
    [files] = [c for c in json.loads(r.stdout)["components"] if c["kind"] == "files"]
    assert files["ok"] and files["point_id"] == older
    assert files["fallback"] and newest in files["fallback"][0]
    (s.tree / "late.bin").unlink()  # the older snapshot is the tree without it
    assert {k for k in tree_facts(restored_root(target / "files" / "app", s.tree))} == set(tree_facts(s.tree))


# --------------------------------------------------------------------------- failover, ransomware, rollback, drill


def _own_servers():
    import boto3
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from dr_pipelines_tests.support.configs import BUCKET
    from dr_pipelines_tests.support.servers import start_gcs_emulator, start_moto

    s3, gcs = start_moto(), start_gcs_emulator()
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.url}
    ).create_bucket(BUCKET)
    return s3, gcs


def _logical_system(pg, tmp_path: Path, locations: dict, **extra) -> Path:
    """The pg fixture's `app` database (the SoundHash sample), a file tree, logical backups."""
    tree = tmp_path / "app_files"
    tree.mkdir()
    make_tree(tree)
    path = tmp_path / "dr.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "databases": {"app": {"host": "127.0.0.1", "port": pg.port, "user": "postgres", "dbname": "app"}},
                "locations": locations,
                "file_sets": {"app": {"paths": [str(tree)]}},
                "files": {"state_dir": str(tmp_path / "state")},
                "recovery": {"quarantine_dir": str(tmp_path / "quarantine"), "incident_margin": "1s"},
                **extra,
            },
            sort_keys=False,  # the locations' order is the config's order of preference
        )
    )
    return path


def test_cross_region_failover_recovers_from_the_first_reachable_location(pg, tmp_path):
    from dr_pipelines_tests.support.configs import gcs_location, s3_location
    from dr_pipelines_tests.support.processes import run_cli

    s3, gcs = _own_servers()
    env = {"STORAGE_EMULATOR_HOST": gcs.url}
    try:
        locations = {
            "s3": {**s3_location(s3), "region": "eu-west-1", "connect_timeout": "1s", "retry_for": "1s"},
            "gcs": {**gcs_location(), "region": "us-central1", "connect_timeout": "1s", "retry_for": "1s"},
            "local": {"type": "local", "path": str(tmp_path / "repo"), "region": "on-site"},
        }
        path = _logical_system(pg, tmp_path, locations)
        cfg = ["--config", str(path)]
        assert run_cli(*cfg, "backup", "app", env=env).returncode == 0
        assert run_cli(*cfg, "snapshot", "app", env=env).returncode == 0
        source = pg.table_checksums("app")
        tree = tmp_path / "app_files"
        s3.stop()  # the primary region is gone

        plan = run_cli(*cfg, "recover", "failover", "--into", str(tmp_path / "plan"), "--plan", env=env)
        assert plan.returncode == 0, plan.stderr
        assert "read from: gcs (region us-central1)" in plan.stdout and "left out: s3: down" in plan.stdout, plan.stdout

        for survivor, stop in (("gcs", None), ("local", gcs)):
            if stop is not None:
                stop.stop()
            with pg.connect() as conn:  # the new server: the database is not there yet
                conn.execute("DROP DATABASE IF EXISTS app WITH (FORCE)")
            into = tmp_path / f"from-{survivor}"
            r = run_cli(*cfg, "recover", "failover", "--into", str(into), env=env)
            assert r.returncode == 0, r.stderr
            report = json.loads(r.stdout)
            assert report["passed"] and report["locations_used"] == [survivor]
            assert report["left_out"]["s3"].startswith("down")
            assert any(f"failover to location {survivor}" in n for n in report["notes"])
            assert pg.table_checksums("app") == source
            assert tree_facts(restored_root(into / "files" / "app", tree)) == tree_facts(tree)
    finally:
        s3.stop()
        gcs.stop()


def test_ransomware_recovery_quarantines_and_restores_the_last_proven_point_into_fresh_targets(pg, tmp_path):
    from dataclasses import asdict

    from dr_pipelines.core.files import format as fmt
    from dr_pipelines.core.files.restore import test_restore_files
    from dr_pipelines.core.repository.records import RecordKind, store_json_record
    from dr_pipelines.core.storage.locations import open_locations
    from dr_pipelines_tests.support.configs import config_from
    from dr_pipelines_tests.support.processes import run_cli

    path = _logical_system(pg, tmp_path, {"local": {"type": "local", "path": str(tmp_path / "repo")}})
    cfg = ["--config", str(path)]
    tree = tmp_path / "app_files"
    assert run_cli(*cfg, "backup", "app").returncode == 0
    assert run_cli(*cfg, "snapshot", "app").returncode == 0
    into = tmp_path / "clean"
    time.sleep(1.1)  # older than the incident margin (1 s)

    # nothing restore-tested yet: refused, and the reason for each candidate is given
    r = run_cli(*cfg, "recover", "ransomware", "--into", str(into), "--lookback", "0s", "--plan")
    assert r.returncode != 0 and "no passed restore test of it" in r.stderr and not into.exists()

    assert run_cli(*cfg, "test-restore", "app").returncode == 0
    config = config_from(path)
    locations = open_locations(config)
    test = test_restore_files(config, locations, "app", log=lambda m: None)
    assert test.passed
    store_json_record(locations, fmt.records_owner("app"), RecordKind.RESTORE_TEST, test.started_at, asdict(test))
    good_rows, good_tree = pg.table_checksums("app"), tree_facts(tree)
    assert run_cli(*cfg, "backup", "app").returncode == 0  # a later backup, never restore-tested
    time.sleep(2)
    from datetime import datetime, timezone

    incident = datetime.now(timezone.utc).isoformat()
    with pg.connect("app") as conn:  # the attack: rows gone, files encrypted
        conn.execute("DELETE FROM fingerprints")
    for f in [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]:
        f.write_bytes(os.urandom(64))
    assert run_cli(*cfg, "backup", "app").returncode == 0  # backups after the attack exist too
    assert run_cli(*cfg, "snapshot", "app").returncode == 0

    r = run_cli(*cfg, "recover", "ransomware", "--into", str(into), "--incident-time", incident)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["scenario"] == "ransomware_recovery"
    [db] = [c for c in report["components"] if c["kind"] == "database"]
    target = db["where"].split("'")[1]
    assert target.startswith("app_recovered_")  # a fresh database: the compromised one is left as it is
    assert pg.table_checksums(target) == good_rows
    assert pg.row_counts("app")["public.fingerprints"] == 0  # the compromised database is left as it was
    assert tree_facts(restored_root(into / "files" / "app", tree)) == good_tree
    extra = report["extra"]
    captured = extra["quarantine"]["captured"]
    assert "files-app.tar" in captured and "database-app.pgdump" in captured
    quarantine = Path(extra["quarantine"]["path"])
    sums = (quarantine / "SHA256SUMS").read_text()
    assert captured["files-app.tar"]["sha256"] in sums and oct(quarantine.stat().st_mode)[-3:] == "500"
    changed = extra["changed_since_last_good"]["app"]
    assert changed["changed"] > 0 and changed["paths"]["changed"]
    assert any("role 'postgres'" in item for item in extra["rotate"])
    plan = run_cli(*cfg, "recover", "ransomware", "--into", str(tmp_path / "x"), "--incident-time", incident, "--plan")
    assert "no passed restore test of it" in plan.stdout  # the later, untested backup: rejected, and why


def test_service_rollback_puts_back_the_deployment_when_the_old_version_is_unhealthy(pg, tmp_path):
    from datetime import datetime, timezone

    from dr_pipelines_tests.support.processes import run_cli

    services = tmp_path / "services"
    services.mkdir()
    api = _service(services, "api")
    # healthy only while the deployed files say so: a rollback to a version without it fails its checks
    health_port = int(api["health_checks"][0]["url"].rsplit(":", 1)[1].strip("/"))
    tree = tmp_path / "app_files"
    start = (
        f"echo api >> {services}/started.log; grep -q healthy {tree}/VERSION && "
        f"(nohup {sys.executable} -m http.server {health_port} --bind 127.0.0.1 --directory {services} "
        f">/dev/null 2>&1 & echo $! > {services}/api.pid) || true"
    )
    api["start"] = [{"command": ["sh", "-c", start]}]
    path = _logical_system(
        pg,
        tmp_path,
        {"local": {"type": "local", "path": str(tmp_path / "repo")}},
        services={"api": {**api, "file_sets": ["app"], "databases": ["app"], "paths": [str(tree / "VERSION")]}},
    )
    cfg = ["--config", str(path)]
    (tree / "VERSION").write_text("v1 healthy\n")
    assert run_cli(*cfg, "backup", "app").returncode == 0
    assert run_cli(*cfg, "snapshot", "app").returncode == 0
    time.sleep(1.1)
    before = datetime.now(timezone.utc).isoformat()
    time.sleep(1.1)
    (tree / "VERSION").write_text("v2 healthy\n")  # the deployment
    (tree / "other.txt").write_text("not the service's: never rolled back\n")

    plan = run_cli(*cfg, "recover", "rollback", "api", "--before", before, "--plan")
    assert plan.returncode == 0, plan.stderr
    assert "file set app: snapshot" in plan.stdout and str(tree / "VERSION") in plan.stdout
    assert (tree / "VERSION").read_text() == "v2 healthy\n"  # --plan touches nothing
    r = run_cli(*cfg, "recover", "rollback", "api", "--before", before)
    assert r.returncode == 2 and "confirm by naming it" in r.stderr
    r = run_cli(*cfg, "recover", "rollback", "api", "--before", before, "--yes", "api")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and (tree / "VERSION").read_text() == "v1 healthy\n"
    [aside] = report["kept_aside"].values()
    assert Path(aside).read_text() == "v2 healthy\n"  # the deployment is kept, not deleted
    assert (tree / "other.txt").exists()
    Path(aside).unlink()

    # a deployment whose previous version cannot start: the rollback puts the deployment back, loudly
    for pid in services.glob("*.pid"):
        subprocess.run(["sh", "-c", f"kill $(cat {pid}) 2>/dev/null || true"])
    (tree / "VERSION").write_text("v3 broken\n")
    assert run_cli(*cfg, "snapshot", "app").returncode == 0
    time.sleep(1.1)
    before = datetime.now(timezone.utc).isoformat()
    (tree / "VERSION").write_text("v4 healthy\n")
    r = run_cli(*cfg, "recover", "rollback", "api", "--before", before, "--yes", "api")
    assert r.returncode != 0 and "rollback of 'api' failed" in r.stderr and "back in place and running" in r.stderr
    assert (tree / "VERSION").read_text() == "v4 healthy\n"
    assert [p.read_text() for p in tree.glob("VERSION.failed_rollback_*")] == ["v3 broken\n"]
    for pid in services.glob("*.pid"):
        subprocess.run(["sh", "-c", f"kill $(cat {pid}) 2>/dev/null || true"])


def test_the_full_system_drill_measures_and_leaves_nothing(pg, tmp_path, receiver, monkeypatch):
    from dr_pipelines_tests.support.processes import run_cli

    receiver.start()
    monkeypatch.setenv("DR_TEST_WEBHOOK", f"{receiver.url}/hook")
    monkeypatch.setenv("DR_TEST_PD_KEY", "routing-key")
    path = _logical_system(pg, tmp_path, {"local": {"type": "local", "path": str(tmp_path / "repo")}})
    data = yaml.safe_load(path.read_text())
    data["recovery"]["drill_dir"] = str(tmp_path / "drills")
    data["alerts"] = {
        "chat": {"type": "webhook", "url_env": "DR_TEST_WEBHOOK", "format": "generic"},
        "pager": {"type": "pagerduty", "routing_key_env": "DR_TEST_PD_KEY", "url": f"{receiver.url}/pd"},
    }
    path.write_text(yaml.safe_dump(data))
    cfg = ["--config", str(path)]
    assert run_cli(*cfg, "backup", "app").returncode == 0
    assert run_cli(*cfg, "snapshot", "app").returncode == 0
    before = {r[0] for r in pg.connect().execute("SELECT datname FROM pg_database")}
    r = run_cli(*cfg, "recover", "drill")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["scenario"] == "drill" and report["rto_s"] > 0
    assert {c["component"] if "component" in c else c["kind"] + "/" + c["name"] for c in report["components"]}
    assert {r[0] for r in pg.connect().execute("SELECT datname FROM pg_database")} == before
    assert list((tmp_path / "drills").iterdir()) == []
    assert len(list((tmp_path / "repo" / "_system" / "reports" / "recovery_drill").glob("*.json"))) == 1
    status = run_cli(*cfg, "report", "--json")
    assert status.returncode == 0, status.stderr
    system = json.loads(status.stdout)["system"]
    assert system["drills"] == 1 and system["drill_pass_rate_pct"] == 100.0 and system["rto_met"]

    # a real recovery notifies the channels when it starts and when it ends; the pager is never paged for it
    with pg.connect() as conn:
        conn.execute("DROP DATABASE app WITH (FORCE)")
    r = run_cli(*cfg, "recover", "system", "--into", str(tmp_path / "rebuilt"))
    assert r.returncode == 0, r.stderr
    texts = [b["text"] for b in receiver.bodies("/hook")]
    assert any("recovery started: full_system_recovery" in t for t in texts), texts
    assert any("recovery finished: full_system_recovery" in t for t in texts), texts
    assert receiver.bodies("/pd") == []
    system = json.loads(run_cli(*cfg, "report", "--json").stdout)["system"]
    assert system["recoveries"] == 1 and system["recovery_success_rate_pct"] == 100.0


def test_a_secondary_behind_the_primary_by_more_than_the_rpo_fails_its_check(pg, tmp_path):
    from dr_pipelines_tests.support.configs import config_from
    from dr_pipelines_tests.support.processes import run_cli

    locations = {
        "primary": {"type": "local", "path": str(tmp_path / "primary")},
        "secondary": {"type": "local", "path": str(tmp_path / "secondary")},
    }
    path = _logical_system(pg, tmp_path, locations)
    data = yaml.safe_load(path.read_text())
    data["databases"]["app"]["objectives"] = {"rpo": "1s"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = ["--config", str(path)]
    assert run_cli(*cfg, "backup", "app").returncode == 0

    def secondary_check() -> dict:
        status = json.loads(run_cli(*cfg, "status", "--json").stdout)
        [check] = [c for c in status["checks"] if c["check"] == "secondary_within_rpo" and c["database"] == "app"]
        return check

    assert secondary_check()["passed"], secondary_check()
    time.sleep(2)
    newest = run_cli(*cfg, "backup", "app").stdout.strip().splitlines()[-1]
    shutil.rmtree(tmp_path / "secondary" / "app" / "logical" / newest)  # the secondary missed it
    check = secondary_check()
    assert not check["passed"] and "secondary" in check["description"] and "behind primary" in check["description"]
    # the same verdict as an asset check of DB/logical_backup (the failed-check sensor alerts on it)
    from dr_pipelines.defs import runner

    result = runner.run_job(config_from(path), str(path), "dr_health_checks", allow_failure=True)
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == "secondary_within_rpo"]
    assert not evaluation.passed and "behind primary" in (evaluation.description or "")


def test_a_refused_logical_restore_never_drops_the_live_database_on_a_rerun(pg, tmp_path):
    """The target exists and holds data: the recovery refuses that component, and running it again (as its
    message says to) must not take the live database for one the failed run created."""
    from dr_pipelines_tests.support.processes import run_cli

    path = _logical_system(pg, tmp_path, {"local": {"type": "local", "path": str(tmp_path / "repo")}})
    cfg = ["--config", str(path)]
    assert run_cli(*cfg, "backup", "app").returncode == 0
    assert run_cli(*cfg, "snapshot", "app").returncode == 0
    live = pg.table_checksums("app")
    into = tmp_path / "rebuilt"
    for _ in range(2):
        r = run_cli(*cfg, "recover", "system", "--into", str(into), "--method", "logical", "--no-services")
        assert r.returncode != 0 and "source database 'app' itself" in r.stderr
        assert pg.table_checksums("app") == live
