"""Point-in-time recovery for real: a base backup and WAL archived by PostgreSQL through our command
while pgbench runs, then recovery to a moment during the load into a new directory and port."""

import json
import os
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import sql

from dr_pipelines.core.backup.attempts import BackupFailed
from dr_pipelines.core.backup.base import run_base_backup
from dr_pipelines.core.pitr.recover import PitrError, PitrFailed, PitrRequest, run_pitr
from dr_pipelines.core.postgres.client import DEFAULT_PG_BIN
from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines_tests.support.metadata import number, text
from dr_pipelines_tests.support.processes import reachable_tmpdir
from dr_pipelines_tests.support.wal import WalSetup


@pytest.fixture
def archived(pg):
    setup = WalSetup(pg)
    setup.enable_archiving()
    yield setup
    setup.cleanup()


def _pgbench(port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(DEFAULT_PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *args, "app"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _archive_everything(setup: WalSetup) -> None:
    setup.switch_and_wait(timeout=60)


def _connect(port: int) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="app", autocommit=True)


def test_pitr_to_a_moment_during_pgbench_load(archived, restored_dirs):
    setup, port = archived, archived.server.port
    assert _pgbench(port, "-i", "-s", "2", "-q").wait() == 0
    with _connect(port) as conn:
        conn.execute("CREATE TABLE marks (id int PRIMARY KEY, at timestamptz NOT NULL)")
    load = _pgbench(port, "-n", "-c", "4", "-T", "12")

    marks: list[tuple[int, datetime, datetime]] = []  # id, stored time, when the commit returned
    stop = threading.Event()

    def mark():
        with _connect(port) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                at = conn.execute("INSERT INTO marks VALUES (%s, clock_timestamp()) RETURNING at", (i,)).fetchone()[0]
                marks.append((i, at, datetime.now(timezone.utc)))
                time.sleep(0.02)

    marker = threading.Thread(target=mark)
    marker.start()
    try:
        time.sleep(1)
        base = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest  # under load
        time.sleep(2)
        target = datetime.now(timezone.utc)
        time.sleep(2)
    finally:
        stop.set()
        marker.join()
    assert load.wait() == 0, load.stderr.read()
    _archive_everything(setup)

    data_dir, new_port = restored_dirs(), free_port()
    report = run_pitr(
        setup.config,
        str(setup.config_path),
        PitrRequest("app", data_dir, new_port, target_time=target),
        open_locations(setup.config),
    )
    assert report.promoted and report.backup_id == base.id and report.timeline == 2
    assert report.reached_time is not None and datetime.fromisoformat(report.reached_time) <= target
    assert report.rto_s is not None and report.rto_s > 0
    assert (
        report.data_loss_window_s is not None
        and report.data_loss_window_s >= (datetime.now(timezone.utc) - target).total_seconds() - 60
    )

    with _connect(new_port) as conn:
        # pgbench's invariants: every balance equals the sum of its history deltas
        assert conn.execute(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = "
            "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        ).fetchone()[0]
        for table, col, key in (("pgbench_tellers", "tbalance", "tid"), ("pgbench_branches", "bbalance", "bid")):
            bad = conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {table} t LEFT JOIN (SELECT {key}, sum(delta) s FROM "
                    "pgbench_history GROUP BY {key}) h USING ({key}) "
                    "WHERE t.{col} <> coalesce(h.s, 0)"
                ).format(table=sql.Identifier(table), key=sql.Identifier(key), col=sql.Identifier(col))
            ).fetchone()[0]
            assert bad == 0, f"{table} disagrees with pgbench_history"
        assert conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0] > 0
        present = {r[0] for r in conn.execute("SELECT id FROM marks")}
    committed_before = {i for i, _, returned in marks if returned < target}
    after = {i for i, at, _ in marks if at > target}
    assert committed_before and committed_before <= present  # every commit before the target is there
    assert after and not (after & present)  # and nothing after it


def test_second_pitr_follows_the_new_timeline(archived, restored_dirs):
    setup = archived
    base = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest
    with setup.server.connect("app") as conn:
        conn.execute("CREATE TABLE events (n int)")
        conn.execute("INSERT INTO events VALUES (1)")
    _archive_everything(setup)
    setup.server.cluster.stop("fast")  # the old primary is gone

    first_dir, first_port = restored_dirs(), free_port()
    first = run_pitr(
        setup.config,
        str(setup.config_path),
        PitrRequest("app", first_dir, first_port, archive=True),
        open_locations(setup.config),
    )
    assert first.promoted and first.timeline == 2
    with _connect(first_port) as conn:  # the new primary writes and archives on timeline 2
        conn.execute("INSERT INTO events VALUES (2)")
        seg = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        deadline = time.monotonic() + 60
        while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < seg:
            assert time.monotonic() < deadline, "timeline 2 WAL was not archived"
            time.sleep(0.2)
    assert (setup.repo / "app/wal/00000002/00000002.history.json").exists()
    LocalCluster(first_dir, first_port).stop("fast")

    second_dir, second_port = restored_dirs(), free_port()
    second = run_pitr(
        setup.config,
        str(setup.config_path),
        PitrRequest("app", second_dir, second_port, backup_id=base.id),
        open_locations(setup.config),
    )
    assert second.promoted and second.timeline == 3  # it fetched 00000002.history and followed it
    with _connect(second_port) as conn:
        assert [r[0] for r in conn.execute("SELECT n FROM events ORDER BY n")] == [1, 2]


def test_missing_segment_is_reported_not_hidden(archived, restored_dirs):
    setup = archived
    base = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest
    with setup.server.connect("app") as conn:
        conn.execute("CREATE TABLE events (n int)")
    names = []
    for i in range(3):
        with setup.server.connect("app") as conn:
            conn.execute("INSERT INTO events VALUES (%s)", (i,))
        names.append(setup.switch_and_wait())
    target = datetime.now(timezone.utc)
    _archive_everything(setup)
    hole = names[1]  # a segment in the middle, after the base backup
    for p in (setup.repo / "app/wal/00000001").glob(f"{hole}*"):
        p.unlink()

    with pytest.raises(PitrError, match=f"gap after base backup {base.id}: missing {hole}"):
        run_pitr(
            setup.config,
            str(setup.config_path),
            PitrRequest("app", restored_dirs(), free_port()),
            open_locations(setup.config),
        )  # latest: refused before anything starts
    with pytest.raises(PitrFailed) as failed:
        run_pitr(
            setup.config,
            str(setup.config_path),
            PitrRequest("app", restored_dirs(), free_port(), target_time=target, timeout_s=120),
            open_locations(setup.config),
        )
    report = failed.value.report
    assert not report.promoted and hole in str(failed.value) and "last reachable point" in str(failed.value)
    assert "recovery ended before configured recovery target was reached" in str(failed.value)


def test_targets_outside_the_backups_and_unsafe_directories(archived, restored_dirs):
    setup = archived
    before = datetime.now(timezone.utc) - timedelta(hours=1)
    run_base_backup(setup.config, "app", open_locations(setup.config))
    locs = open_locations(setup.config)
    with pytest.raises(PitrError, match="before the oldest base backup"):
        run_pitr(
            setup.config,
            str(setup.config_path),
            PitrRequest("app", restored_dirs(), free_port(), target_time=before),
            locs,
        )
    with pytest.raises(PitrError, match="in the future"):
        run_pitr(
            setup.config,
            str(setup.config_path),
            PitrRequest(
                "app", restored_dirs(), free_port(), target_time=datetime.now(timezone.utc) + timedelta(hours=1)
            ),
            locs,
        )
    # never over a running cluster, and a non-empty directory only with confirmation
    with pytest.raises(PitrError, match="running PostgreSQL server"):
        run_pitr(
            setup.config,
            str(setup.config_path),
            PitrRequest("app", setup.server.cluster.data_dir, free_port(), overwrite=True),
            locs,
        )
    busy = restored_dirs()
    busy.mkdir(parents=True)
    (busy / "keep.txt").write_text("x")
    with pytest.raises(PitrError, match="exists and is not empty"):
        run_pitr(setup.config, str(setup.config_path), PitrRequest("app", busy, free_port()), locs)
    assert (busy / "keep.txt").exists()
    r = setup.cli("pitr", "app", "--data-dir", str(busy), "--port", str(free_port()), "--latest", "--overwrite")
    assert r.returncode == 2 and "confirm with --yes" in r.stderr
    r = setup.cli(
        "pitr", "app", "--data-dir", str(restored_dirs()), "--port", "5", "--target-time", "2026-11-23T10:00:00"
    )
    assert r.returncode == 2 and "has no time zone" in r.stderr


def test_base_backup_fails_loudly_without_archiving(pg, tmp_path):
    setup = WalSetup(pg)
    try:
        with pytest.raises(BackupFailed, match="archive_mode is off"):
            run_base_backup(setup.config, "app", open_locations(setup.config))
        # archiving on but broken: the WAL never arrives, the backup fails and leaves nothing visible
        pg.cluster.write_settings({"archive_mode": "on", "archive_command": "'false'"})
        pg.cluster.stop("fast")
        pg.cluster.start()
        cfg = setup.config.model_copy(
            update={"wal": setup.config.wal.model_copy(update={"archive_wait": timedelta(seconds=3)})}
        )
        with pytest.raises(BackupFailed, match="waited more than 0:00:03 for its WAL to be archived"):
            run_base_backup(cfg, "app", open_locations(cfg))
        assert not list(setup.repo.rglob("base.tar*")) and not list(setup.repo.rglob("manifest.json"))
        # an archive_command that lies ('true'): PostgreSQL is satisfied, our archive is not; the
        # stored object is removed and no backup appears
        pg.cluster.write_settings({"archive_command": "'true'"})
        pg.cluster.stop("fast")
        pg.cluster.start()
        with pytest.raises(BackupFailed, match="was not archived within 0:00:03"):
            run_base_backup(cfg, "app", open_locations(cfg))
        assert not list(setup.repo.rglob("base.tar*")) and not list(setup.repo.rglob("manifest.json"))
    finally:
        setup.cleanup()


def test_dagster_layer_base_backup_wal_checks_pitr_job_and_drill(archived, restored_dirs):
    import dagster as dg

    from dr_pipelines.core.monitoring.health import WAL_CONTINUOUS, WAL_LAG
    from dr_pipelines.defs.build import build_definitions
    from dr_pipelines.defs.pitr.jobs import PITR_PASSED
    from dr_pipelines.defs.wal.assets import WAL_OBSERVER, wal_archive_key

    setup = archived
    defs = build_definitions(setup.config, str(setup.config_path))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("app__base_backup_job").execute_in_process(instance=instance)
    assert result.success
    [mat] = result.asset_materializations_for_node("app__base_backup")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["timeline"] == 1 and text(md["wal_start"]) <= text(md["wal_stop"]) and number(md["size_bytes"]) > 0
    with setup.server.connect("app") as conn:
        conn.execute("CREATE TABLE after_base (n int)")
        conn.execute("INSERT INTO after_base VALUES (42)")
    setup.switch_and_wait()

    # the observer records the archive on the asset; the checks pass
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as ctx:
        tick = defs.resolve_sensor_def(WAL_OBSERVER).evaluate_tick(ctx)
    [obs] = [e for e in tick.asset_events if e.asset_key == wal_archive_key("app")]
    assert obs.metadata["gaps"].value == 0
    # and the backup catalog on app/database: the id an operator pastes into a restore, no event log needed
    [catalog] = [e for e in tick.asset_events if e.asset_key == dg.AssetKey(["app", "database"])]
    table = str(catalog.metadata["backup_catalog"].value)
    assert f"| `{md['backup_id']}` | base |" in table and "| restore test |" in table
    checks = defs.resolve_job_def("dr_health_checks").execute_in_process(instance=instance, raise_on_error=False)
    evals = {(e.asset_key, e.check_name): e for e in checks.get_asset_check_evaluations()}
    assert evals[(wal_archive_key("app"), WAL_CONTINUOUS)].passed
    assert evals[(wal_archive_key("app"), WAL_LAG)].passed

    # the drill: latest base backup + WAL into a scratch directory, measured, removed
    drill = defs.resolve_job_def("__ASSET_JOB").get_subset(asset_selection={dg.AssetKey(["app", "pitr_test"])})
    result = drill.execute_in_process(instance=instance, raise_on_error=False)
    [ev] = [e for e in result.get_asset_check_evaluations() if e.check_name == PITR_PASSED]
    assert ev.passed, ev.description
    [mat] = result.asset_materializations_for_node("app__pitr_test")
    assert number(mat.metadata["rto_s"].value) > 0 and number(mat.metadata["achievable_rpo_s"].value) >= 0

    # the operator's job, from the shell, as the UI would run it
    data_dir = restored_dirs()
    r = setup.cli("pitr", "app", "--latest", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    import json as _json

    report = _json.loads(r.stdout)
    with _connect(report["port"]) as conn:
        assert conn.execute("SELECT n FROM after_base").fetchone()[0] == 42


def test_retention_keeps_the_wal_of_kept_base_backups(archived, restored_dirs):
    """Old base backups and the WAL only they need go; what the kept one needs stays, and PITR from
    it still works afterwards."""
    import json as _json

    from dr_pipelines.core.repository.manifest import MANIFEST
    from dr_pipelines.core.wal.archive import list_archive

    setup = archived
    locs = open_locations(setup.config)
    old = run_base_backup(setup.config, "app", locs).manifest
    for _ in range(2):
        setup.switch_and_wait()
    kept = run_base_backup(setup.config, "app", locs).manifest
    setup.switch_and_wait()
    # age the old backup and every WAL sidecar past the windows
    long_ago = (datetime.now(timezone.utc) - timedelta(days=400)).isoformat()
    key = old.object_key(MANIFEST)
    data = _json.loads(locs["local"].get_bytes(key))
    data["created_at"] = long_ago
    locs["local"].put_bytes(key, _json.dumps(data).encode())
    for side in (setup.repo / "app/wal").rglob("*.json"):  # a file was pushed when its sidecar was written
        aged = time.time() - 400 * 86400
        os.utime(side, (aged, aged))
    cfg_path = setup.config_path
    import yaml as _yaml

    raw = _yaml.safe_load(cfg_path.read_text())
    raw["retention"] = {"daily_days": 30, "weekly_days": 30, "monthly_days": 30, "min_keep": 1, "wal_days": 7}
    cfg_path.write_text(_yaml.safe_dump(raw))
    plan = setup.cli("retention", "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = _json.loads(plan.stdout)
    assert {b["id"] for b in planned["backups"] if not b["keep"]} == {old.id}
    assert planned["wal"] and all(w["name"][8:] < kept.base.wal_start[8:] for w in planned["wal"])
    before = set(list_archive(locs, "app").segments[1])
    r = setup.cli("retention", "apply")
    assert r.returncode == 0, r.stderr
    after = set(list_archive(locs, "app").segments[1])
    assert old.base.wal_start in before and old.base.wal_start not in after
    assert {n for n in before if n >= kept.base.wal_start} <= after  # nothing the kept backup needs
    report = run_pitr(setup.config, str(setup.config_path), PitrRequest("app", restored_dirs(), free_port()), locs)
    assert report.promoted and report.backup_id == kept.id


def test_status_metrics_and_report_cover_base_backups_and_wal(archived, restored_dirs):
    import json as _json

    from prometheus_client import generate_latest

    from dr_pipelines.core.monitoring.health import evaluate
    from dr_pipelines.core.monitoring.metrics import build_registry
    from dr_pipelines.defs.pitr.jobs import run_pitr_drill

    setup = archived
    locs = open_locations(setup.config)
    base = run_base_backup(setup.config, "app", locs).manifest
    setup.switch_and_wait()
    drill = run_pitr_drill(setup.config, str(setup.config_path), "app", locs, lambda m: None)
    assert drill.report.promoted and drill.achievable_rpo_s is not None and drill.achievable_rpo_s >= 0

    h = evaluate(setup.config, locs, datetime.now(timezone.utc))
    by_check = {o.check: o for o in h.outcomes}
    assert by_check["wal_continuous"].passed and by_check["wal_archive_lag_within_rpo"].passed
    assert by_check["base_backup_fresh"].passed and by_check["base_backup_replicated"].passed
    text = generate_latest(build_registry(setup.config, h)).decode()
    assert 'wal_archive_gaps{database="app"} 0.0' in text
    from dr_pipelines_tests.support.metrics import metric_value

    assert metric_value(text, "backup_size_bytes", database="app", kind="base") == base.size_bytes

    report = _json.loads(setup.cli("report", "--days", "1", "--json").stdout)
    [row] = [r for r in report["summary"] if r["kind"] == "base+wal"]
    assert row["backups"] == 1 and row["rpo_met"] and row["rpo_achieved_s"] <= 120

    # a gap in the archive: status is an error naming it
    victim = next((setup.repo / "app/wal/00000001").glob(f"{base.base.wal_stop}.json"))
    victim.unlink()
    setup.switch_and_wait()
    status = setup.cli("status")
    assert status.returncode == 2 and "wal_continuous" in status.stdout and base.base.wal_stop in status.stdout


def test_lsn_xid_and_restore_point_targets(archived, restored_dirs):
    """An LSN picks its base backup, and so does an xid (each base backup records the next xid
    after it ended); a restore point cannot be placed before replay, so a newer base backup that
    lies after it is tried first, then the older one that works."""
    setup = archived
    older = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest
    with setup.server.connect("app") as conn:
        conn.execute("CREATE TABLE steps (n int)")
        conn.execute("INSERT INTO steps VALUES (1)")
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        with conn.transaction():
            conn.execute("INSERT INTO steps VALUES (2)")
            xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        conn.execute("SELECT pg_create_restore_point('before_three')")
        conn.execute("INSERT INTO steps VALUES (3)")
    setup.switch_and_wait()
    newer = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest
    with setup.server.connect("app") as conn:
        conn.execute("INSERT INTO steps VALUES (4)")
    setup.switch_and_wait()
    locs = open_locations(setup.config)

    by_lsn_dir, by_lsn_port = restored_dirs(), free_port()
    report = run_pitr(
        setup.config, str(setup.config_path), PitrRequest("app", by_lsn_dir, by_lsn_port, target_lsn=str(lsn)), locs
    )
    assert report.promoted
    with _connect(by_lsn_port) as conn:
        assert [r[0] for r in conn.execute("SELECT n FROM steps ORDER BY n")] == [1]
    # the targets do not stay behind in the promoted cluster's settings (nor in backups taken of it)
    auto = (by_lsn_dir / "postgresql.auto.conf").read_text()
    assert "recovery_target_lsn" not in auto and "recovery_target_action" not in auto
    LocalCluster(by_lsn_dir, by_lsn_port).stop("fast")

    by_name_dir, by_name_port = restored_dirs(), free_port()
    report = run_pitr(
        setup.config,
        str(setup.config_path),
        PitrRequest("app", by_name_dir, by_name_port, target_name="before_three"),
        locs,
    )
    assert report.promoted and "before_three" in (report.stop_reason or "")
    assert report.backup_id == older.id and report.tried == [newer.id]
    with _connect(by_name_port) as conn:
        assert [r[0] for r in conn.execute("SELECT n FROM steps ORDER BY n")] == [1, 2]
    assert "recovery_target_name" not in (by_name_dir / "postgresql.auto.conf").read_text()
    LocalCluster(by_name_dir, by_name_port).stop("fast")

    by_xid_dir, by_xid_port = restored_dirs(), free_port()
    report = run_pitr(
        setup.config, str(setup.config_path), PitrRequest("app", by_xid_dir, by_xid_port, target_xid=xid), locs
    )
    # the newer backup recorded the next xid after it ended: the xid is before it, so it is skipped
    assert newer.base.next_xid_after is not None and older.base.next_xid_after is not None
    assert int(newer.base.next_xid_after) > int(xid) >= int(older.base.next_xid_after)
    assert report.promoted and report.backup_id == older.id and report.tried == []
    with _connect(by_xid_port) as conn:  # the target transaction included, nothing after it
        assert [r[0] for r in conn.execute("SELECT n FROM steps ORDER BY n")] == [1, 2]
    LocalCluster(by_xid_dir, by_xid_port).stop("fast")

    # a restore point that exists nowhere: every base backup is tried, then a clear failure
    with pytest.raises(PitrFailed, match="recovery ended before configured recovery target was reached") as e:
        run_pitr(
            setup.config,
            str(setup.config_path),
            PitrRequest("app", restored_dirs(), free_port(), target_name="never_made"),
            locs,
        )
    assert e.value.report.tried == [newer.id] and e.value.report.backup_id == older.id


@pytest.mark.parametrize("chunk", [1, 7, 512, 1 << 20])
def test_tar_watcher_keeps_the_manifest_whatever_the_read_sizes(chunk):
    """The base backup reads start/stop LSN from the backup_manifest as the tar stream passes."""
    import io
    import tarfile

    from dr_pipelines.core.backup.base import TarWatcher, wal_range

    manifest = b'{"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]}'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in (
            ("base/1/1259", b"\x00" * 8193),
            ("backup_label", b"START WAL LOCATION: 0/2000028"),
            ("global/pg_control", b"c" * 513),
            ("backup_manifest", manifest),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    watcher = TarWatcher(io.BytesIO(raw), {"backup_manifest", "backup_label"})
    passed = b""
    while data := watcher.read(chunk):
        passed += data
    assert passed == raw  # the stream itself is untouched
    assert watcher.members["backup_manifest"] == manifest
    assert watcher.members["backup_label"].startswith(b"START WAL LOCATION")
    assert wal_range(manifest) == {
        "timeline": 1,
        "start_lsn": "0/2000028",
        "stop_lsn": "0/2000100",
        "ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}],
    }


def test_stop_lsn_on_a_segment_boundary_names_the_segment_before():
    from dr_pipelines.core.postgres.wal_names import lsn_to_segment

    size = 16 << 20
    assert lsn_to_segment("0/3000000", 1, size) == "000000010000000000000003"
    assert lsn_to_segment("0/3000000", 1, size, end=True) == "000000010000000000000002"
    assert lsn_to_segment("0/3000100", 1, size, end=True) == "000000010000000000000003"


def test_without_a_base_backup_the_hint_is_a_command_that_exists(tmp_path):
    import shlex

    from dr_pipelines.cli.main import build_parser
    from dr_pipelines.core.pitr.recover import choose_base_backup
    from dr_pipelines.core.repository.catalog import BackupNotFound

    request = PitrRequest("app", tmp_path / "data", 5999)
    with pytest.raises(BackupNotFound, match="no base backup of 'app'") as e:
        choose_base_backup([], request, datetime.now(timezone.utc))
    hint = str(e.value).split("`")[1]
    args = build_parser().parse_args(shlex.split(hint)[1:])  # without the program name
    assert (args.command, args.db, args.kind) == ("backup", "app", "base")


def test_base_backup_of_a_cluster_with_tablespaces_is_refused_clearly(archived):
    from dr_pipelines.core.postgres.cluster import chown_to_postgres

    setup = archived
    location = reachable_tmpdir("drpt-tblspc-")
    chown_to_postgres(location)
    with setup.server.connect() as conn:
        conn.execute(f"CREATE TABLESPACE fast_disk LOCATION '{location}'")
    try:
        with pytest.raises(
            BackupFailed,
            match=r"has tablespaces outside the data directory \(fast_disk\).*"
            "nothing was stored",
        ):
            run_base_backup(setup.config, "app", open_locations(setup.config))
        assert not (setup.repo / "app" / "base").exists() or not any((setup.repo / "app" / "base").rglob("*"))
    finally:
        with setup.server.connect() as conn:
            conn.execute("DROP TABLESPACE fast_disk")


def test_xid_comparison_wraps_like_postgresql():
    from dr_pipelines.core.pitr.recover import xid_not_before

    assert xid_not_before("1000", "900") and not xid_not_before("800", "900")
    assert xid_not_before("800", None) is None  # manifests from before the xid was recorded
    epoch1 = (1 << 32) + 100  # next xid 100 in epoch 1: a 32-bit xid is compared modulo 2^32
    assert xid_not_before("150", str(epoch1)) and not xid_not_before("50", str(epoch1))
    assert xid_not_before(str((1 << 32) - 5), str(3)) is False  # just before the wrap: older
    assert xid_not_before(str((1 << 32) + 150), str(epoch1))  # a full 64-bit xid compares as is


def test_xid_target_is_read_like_postgresql_reads_it(tmp_path):
    from dr_pipelines.core.config import ConfigError

    assert PitrRequest("app", tmp_path, 5999, target_xid="0x1A").target_xid == "26"
    assert PitrRequest("app", tmp_path, 5999, target_xid=" 745321 ").target_xid == "745321"
    with pytest.raises(ConfigError, match="'abc' is not a transaction id"):
        PitrRequest("app", tmp_path, 5999, target_xid="abc")


def test_tar_that_cannot_write_fails_once_and_says_why(archived, restored_dirs):
    """tar (as postgres) cannot write into the data directory: its own error is reported, and the
    other copies are not tried (they would fail the same way)."""
    from dr_pipelines.core.codec.keys import load_identities
    from dr_pipelines.core.pitr.recover import extract
    from dr_pipelines.core.repository.catalog import load_catalog

    setup = archived
    locs = open_locations(setup.config)
    run_base_backup(setup.config, "app", locs)
    [entry] = load_catalog(locs.values(), "app", "base").entries
    data_dir = restored_dirs()
    data_dir.mkdir(mode=0o700)  # owned by root: the postgres user cannot create anything in it
    messages = []
    with pytest.raises(PitrError, match=r"tar could not extract base backup .*Permission denied.*no other copy"):
        extract(setup.config, entry, locs, data_dir, load_identities(setup.config), messages.append)
    assert list(data_dir.iterdir()) == []


def test_pitr_while_a_location_is_down_recovers_from_the_reachable_ones(pg, restored_dirs):
    """The region-failure case: S3 is down, the local copy answers. PostgreSQL probes files that exist
    nowhere (00000002.history): asked of a down S3, wal-fetch could not rule them out and recovery
    aborted. The recovery reads only the locations that answer, and the report says which it left out."""
    import boto3

    from dr_pipelines_tests.support.configs import BUCKET, s3_location
    from dr_pipelines_tests.support.servers import start_moto

    doomed = start_moto()
    boto3.client("s3", endpoint_url=doomed.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    setup = WalSetup(pg, {"s3": s3_location(doomed)})
    try:
        setup.enable_archiving()
        base = setup.cli("backup", "app", "--kind", "base")
        assert base.returncode == 0, base.stderr
        with setup.server.connect("app") as conn:
            conn.execute("CREATE TABLE after_base AS SELECT generate_series(1, 5000) AS n")
        _archive_everything(setup)
        doomed.stop()

        data_dir = restored_dirs()
        r = setup.cli("pitr", "app", "--latest", "--data-dir", str(data_dir))
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["locations_used"] == ["local"] and list(report["left_out"]) == ["s3"]
        assert any("location s3 was left out" in w for w in report["warnings"])
        with _connect(report["port"]) as conn:
            assert conn.execute("SELECT count(*) FROM after_base").fetchone()[0] == 5000
        LocalCluster(data_dir, report["port"]).stop("fast")

        named = restored_dirs()  # a person may name the locations: the same recovery, from local alone
        r = setup.cli("pitr", "app", "--latest", "--data-dir", str(named), "--location", "local")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["left_out"] == {"s3": "not chosen (locations)"}
        assert "--location local" in (named / "postgresql.auto.conf").read_text()
        with _connect(report["port"]) as conn:
            assert conn.execute("SELECT count(*) FROM after_base").fetchone()[0] == 5000
        r = setup.cli("pitr", "app", "--latest", "--data-dir", str(restored_dirs()), "--location", "nowhere")
        assert r.returncode == 2 and "no location named 'nowhere'" in r.stderr
    finally:
        doomed.stop()
        setup.cleanup()
