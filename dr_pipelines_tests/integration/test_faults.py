"""Faults injected into real runs (marked `faults`: `./dev test -m faults` runs them alone).

Each asserts what an operator needs after the fault: nothing half-made is listed, the next run
succeeds without a hand, and the data restored equals the source."""

import json
import os
import shutil
import signal
import subprocess
import time

import dagster as dg
import psycopg
import pytest

from dr_pipelines_tests.support.configs import BUCKET, gcs_location, local_location, s3_location
from dr_pipelines_tests.support.processes import PROJECT_ROOT, VENV_BIN, run_cli
from dr_pipelines_tests.support.servers import start_gcs_emulator, start_moto
from dr_pipelines_tests.support.wal import WalSetup

pytestmark = pytest.mark.faults


def _filler(pg, rows: int = 40_000) -> None:
    """~40 MB in `app`, so a dump runs long enough to be killed in the middle."""
    with pg.connect("app") as conn:
        conn.execute(
            "CREATE TABLE filler AS SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') "
            "FROM generate_series(1, 32) i) AS junk FROM generate_series(1, %s) g",
            (rows,),
        )


def _temp_files(root) -> list[str]:
    return [str(p) for p in root.rglob(".*") if ".tmp-" in p.name]


def _dagster_home(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")  # pools: one run per database
    return home


def _runs(home, monkeypatch) -> list[dg.DagsterRun]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        return list(instance.get_runs())


def test_a_killed_backup_never_blocks_the_next_and_is_reported(pg, write_config, tmp_path, monkeypatch):
    _filler(pg)
    repo = tmp_path / "repo"
    path = write_config(pg, {"local": local_location(repo)})
    home = _dagster_home(tmp_path)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen(
        [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "backup", "app"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    attempts = repo / "app" / "reports" / "backup_attempt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (attempts.exists() and any(attempts.iterdir())):
        time.sleep(0.02)
    assert proc.poll() is None, "the backup ended before it could be killed: " + proc.stderr.read().decode()
    while time.monotonic() < deadline and proc.poll() is None and not _temp_files(repo):
        time.sleep(0.01)  # until the dump streams into its upload
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    [run] = _runs(home, monkeypatch)
    assert run.status == dg.DagsterRunStatus.STARTED  # what Dagster is left believing
    listed = json.loads(run_cli("--config", str(path), "backups", "list", "--json").stdout)
    assert listed["backups"] == []  # nothing half-made is listed
    status = run_cli("--config", str(path), "status", "--json")
    assert status.returncode == 2 and "never finished: its process" in status.stdout, status.stdout  # status says so
    assert _temp_files(repo), "the killed upload left no temp file: the kill came too late to test the sweep"
    assert "leftovers of killed runs" in status.stdout

    again = run_cli("--config", str(path), "backup", "app", env={"DAGSTER_HOME": str(home)}, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "marked failed and its pool slot freed" in again.stderr
    assert sorted(r.status.value for r in _runs(home, monkeypatch)) == ["FAILURE", "SUCCESS"]

    assert "removed a leftover of a killed run" in again.stderr
    assert _temp_files(repo) == []  # nothing half-written stays
    for backup_dir in (repo / "app" / "logical").iterdir():
        assert (backup_dir / "manifest.json").exists(), f"{backup_dir} has objects but no manifest"
    backup_id = again.stdout.strip().splitlines()[-1]
    restored = run_cli("--config", str(path), "restore", "app", "--backup", backup_id, "--into", "app_copy")
    assert restored.returncode == 0, restored.stderr
    assert pg.table_checksums("app_copy") == pg.table_checksums("app")
    after = run_cli("--config", str(path), "status", "--json").stdout
    assert "never finished" not in after and f"last attempt {backup_id} succeeded" in after  # cleared by a good one


def test_a_backup_waiting_for_its_pool_says_so_and_stops_on_sigterm(pg, write_config, tmp_path, monkeypatch):
    path = write_config(pg, {"local": local_location(tmp_path / "repo")})
    home = _dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:  # another run of this database holds its pool
        instance.event_log_storage.initialize_concurrency_limit_to_default("pg_app")  # as a first run would
        instance.event_log_storage.claim_concurrency_slot("pg_app", "another-run", "app__logical_backup")
    proc = subprocess.Popen(
        [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "backup", "app"],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "waiting for pool pg_app: run another-run" in line or not line:
            break
    assert "SIGTERM or Ctrl-C stops waiting" in lines[-1], "".join(lines)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.FAILURE  # not left STARTED, holding nothing
        assert instance.event_log_storage.get_concurrency_info("pg_app").active_run_ids == {"another-run"}


def _own_server(kind: str):
    """A server this test may stop (the session's are shared), with an empty bucket."""
    import boto3
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    server = start_moto() if kind == "s3" else start_gcs_emulator()
    if kind == "s3":
        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    else:
        storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": server.url}
        ).create_bucket(BUCKET)
    return server


@pytest.mark.parametrize("dead", ["s3", "gcs"])
def test_a_dead_location_costs_seconds_and_the_restore_falls_back(pg, write_config, tmp_path, dead):
    server = _own_server(dead)
    try:
        remote = s3_location(server) if dead == "s3" else gcs_location()
        # the dead location comes first: the restore prefers it, and must give up on it quickly
        path = write_config(pg, {dead: remote, "local": local_location(tmp_path / "repo")})
        env = {"STORAGE_EMULATOR_HOST": server.url} if dead == "gcs" else {}
        first = run_cli("--config", str(path), "backup", "app", env=env)
        assert first.returncode == 0, first.stderr
        server.stop()

        t0 = time.monotonic()
        backup = run_cli("--config", str(path), "backup", "app", env=env)
        backup_s = time.monotonic() - t0
        assert backup.returncode == 1 and f"location '{dead}'" in backup.stderr  # loud, naming it
        local = json.loads(run_cli("--config", str(path), "backups", "list", "--json", "--location", "local").stdout)
        assert len(local["backups"]) == 2  # the second backup was stored on the live location all the same

        t0 = time.monotonic()
        restored = run_cli("--config", str(path), "restore", "app", "--latest", "--into", "app_copy", env=env)
        restore_s = time.monotonic() - t0
        assert restored.returncode == 0, restored.stderr
        assert pg.table_checksums("app_copy") == pg.table_checksums("app")
        # each command pays one timeout for the dead location, not the client libraries' minutes
        # (the command itself takes ~4 s to start Dagster and run the job)
        print(f"{dead} down: backup {backup_s:.1f}s, restore with fallback {restore_s:.1f}s")
        assert backup_s < 25 and restore_s < 30
    finally:
        server.stop()


def test_a_killed_restore_leaves_plaintext_and_a_staging_database_only_until_the_next(pg, write_config, tmp_path):
    _filler(pg)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = write_config(pg, {"local": local_location(tmp_path / "repo")}, database={"scratch_dir": str(scratch)})
    assert run_cli("--config", str(path), "backup", "app").returncode == 0
    proc = subprocess.Popen(
        [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "restore", "app", "--latest", "--into", "app_copy"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    staging: list = []
    while time.monotonic() < deadline and proc.poll() is None and not staging:
        with pg.connect() as conn:
            staging = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE '%__restoring_%'").fetchall()
        time.sleep(0.05)
    assert proc.poll() is None and staging, "the restore ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(scratch.glob("dr-restore-*")), "no scratch directory left: the kill came too late"

    status = run_cli("--config", str(path), "status")
    assert "staging database" in status.stdout and "restore scratch directory (may hold plaintext)" in status.stdout

    again = run_cli("--config", str(path), "restore", "app", "--latest", "--into", "app_copy")
    assert again.returncode == 0, again.stderr
    assert list(scratch.iterdir()) == []  # no plaintext stays on this host
    with pg.connect() as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert not [n for n in names if "__restoring_" in n]
    assert pg.table_checksums("app_copy") == pg.table_checksums("app")


def _data_dir_of(tmp_path, name: str, control: bytes):
    """What archive_command sees of a cluster: its data directory, with global/pg_control."""
    data_dir = tmp_path / name
    (data_dir / "global").mkdir(parents=True)
    (data_dir / "pg_wal").mkdir()
    (data_dir / "global" / "pg_control").write_bytes(control)
    return data_dir


def test_a_foreign_clusters_history_file_is_refused(pg, tmp_path):
    ours = WalSetup(pg)
    try:
        ours.enable_archiving()
        ours.switch_and_wait()  # the archive now belongs to our cluster
        control = (pg.cluster.data_dir / "global" / "pg_control").read_bytes()
        sysid = int.from_bytes(control[:8], "little")
        other = (sysid + 1).to_bytes(8, "little") + control[8:]
        for name, data_dir, expect in (
            ("foreign", _data_dir_of(tmp_path, "foreign", other), 1),
            ("ours", _data_dir_of(tmp_path, "ours", control), 0),
        ):
            (data_dir / "pg_wal" / "00000009.history").write_text("1\t0/3000000\tno recovery target specified\n")
            r = subprocess.run(
                [
                    str(VENV_BIN / "dr-pipelines"),
                    "--config",
                    str(ours.config_path),
                    "wal-push",
                    "--db",
                    "app",
                    "pg_wal/00000009.history",
                ],
                cwd=data_dir,
                capture_output=True,
                text=True,
            )
            assert r.returncode == expect, f"{name}: {r.stderr}"
            if expect:  # refused, naming both clusters; nothing was archived
                assert f"pushed by cluster {sysid + 1}" in r.stderr and "refusing to mix them" in r.stderr
                assert not list((ours.repo / "app" / "wal").rglob("00000009.history*"))
        assert list((ours.repo / "app" / "wal").rglob("00000009.history.json"))  # ours was archived
    finally:
        ours.cleanup()


def _flip(path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _checks(setup, *flags) -> dict[str, dict]:
    out = json.loads(setup.cli("status", "--json", *flags).stdout)
    return {c["check"]: c for c in out["checks"] if c["database"] == "app"}


def test_a_flipped_bit_in_any_kind_of_object_is_found_and_named(pg):
    setup = WalSetup(pg, encrypted=False)
    try:
        setup.enable_archiving()
        older = json.loads(setup.cli("backups", "list", "--json").stdout or '{"backups": []}')["backups"]
        assert older == []
        first = setup.cli("backup", "app").stdout.strip().splitlines()[-1]
        newest = setup.cli("backup", "app").stdout.strip().splitlines()[-1]
        base = setup.cli("backup", "app", "--kind", "base")
        assert base.returncode == 0, base.stderr
        base_id = base.stdout.strip().splitlines()[-1]
        segment = setup.switch_and_wait()
        assert _checks(setup, "--verify")["wal_integrity"]["status"] == "ok"  # all good before the flips

        # the newest manifest, on the only location: verify --latest must not pass on the older one
        _flip(setup.repo / "app" / "logical" / newest / "manifest.json")
        verify = setup.cli("backups", "verify", "app", "--latest")
        assert verify.returncode == 1 and f"unreadable manifest app/logical/{newest}/manifest.json" in verify.stdout
        assert f"(newer than {first}, which was verified instead)" in verify.stdout
        listed = setup.cli("backups", "list", "app")
        assert first in listed.stdout and newest not in listed.stdout and "unreadable manifest" in listed.stderr

        # a base backup's object: its verify fails on the checksum
        [tar] = [p for p in (setup.repo / "app" / "base" / base_id).iterdir() if p.name.startswith("base.tar")]
        _flip(tar, at=tar.stat().st_size // 2)
        bad_base = setup.cli("backups", "verify", "app", base_id)
        assert bad_base.returncode == 1 and "FAILED" in bad_base.stdout

        # an archived WAL segment: found by status --verify, before any replay needs it
        [stored] = [p for p in (setup.repo / "app" / "wal").rglob(f"{segment}*") if not p.name.endswith(".json")]
        _flip(stored, at=stored.stat().st_size // 2)
        wal = _checks(setup, "--verify")["wal_integrity"]
        assert wal["status"] == "error" and f"{segment} fails its checksum (corrupt object)" in wal["description"]

        # a record: skipped alone, the others still count (the last attempt is still known)
        attempts = sorted((setup.repo / "app" / "reports" / "backup_attempt").glob("*.json"))
        _flip(attempts[0])
        last = _checks(setup)["last_backup_attempt_succeeded"]
        assert last["status"] == "ok" and f"last attempt {newest} succeeded" in last["description"]
    finally:
        setup.cleanup()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_pushes_of_one_segment_with_different_bytes_never_both_succeed(pg, s3, tmp_path, where):
    """A split brain: two clusters archive the same segment name at once. The commit marker is an
    exclusive create, so one wins; the other is told, and what was archived is the winner's."""
    import threading

    from dr_pipelines.core.storage.locations import open_locations
    from dr_pipelines.core.wal.archive import WalError
    from dr_pipelines.core.wal.fetch import fetch_bytes
    from dr_pipelines.core.wal.push import wal_push

    setup = WalSetup(pg, extra_locations={"s3": s3_location(s3)} if where == "s3" else None, encrypted=False)
    try:
        setup.enable_archiving()
        archived = setup.switch_and_wait()
        segment = next(p for p in (pg.cluster.data_dir / "pg_wal").iterdir() if p.name == archived).read_bytes()
        config = setup.config
        locations = open_locations(config, where if where == "s3" else "local")
        for trial in range(6):
            name = f"00000001000000000000{0xA0 + trial:04X}"
            copies = []
            for variant in (0, 1):
                data = bytearray(segment)
                data[4096] ^= 1 + variant  # same header (same cluster), different content
                path = tmp_path / f"{trial}-{variant}" / name
                path.parent.mkdir()
                path.write_bytes(bytes(data))
                copies.append(path)
            barrier, outcome = threading.Barrier(2), {}

            def push(i: int, barrier=barrier, copies=copies, outcome=outcome) -> None:
                barrier.wait()
                try:
                    wal_push(config, "app", copies[i], locations)
                    outcome[i] = "archived"
                except WalError as e:
                    outcome[i] = str(e)

            threads = [threading.Thread(target=push, args=(i,)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i, o in outcome.items() if o == "archived"]
            assert len(winners) <= 1, f"trial {trial}: both pushes were told 'archived'"
            fetched = fetch_bytes(config, "app", name, locations, None, log=lambda m: None)
            if winners:
                assert fetched is not None and fetched[0] == copies[winners[0]].read_bytes()
            for i in set(outcome) - set(winners):
                assert "different content" in outcome[i] or "in progress" in outcome[i], outcome[i]
    finally:
        setup.cleanup()


def test_a_push_killed_between_object_and_sidecar_is_retried_cleanly(pg):
    from dr_pipelines.core.storage.locations import open_locations
    from dr_pipelines.core.wal.archive import WalError
    from dr_pipelines.core.wal.fetch import fetch_bytes
    from dr_pipelines.core.wal.push import STALE_PUSH, wal_push

    setup = WalSetup(pg, encrypted=False)
    try:
        setup.enable_archiving()
        name = setup.switch_and_wait()
        segment = pg.cluster.data_dir / "pg_wal" / name
        data = segment.read_bytes()
        locations = open_locations(setup.config)
        stored = next(p for p in (setup.repo / "app" / "wal").rglob(f"{name}*") if not p.name.endswith(".json"))
        sidecar = stored.with_name(f"{name}.json")
        sidecar.unlink()  # as if the push had been killed after the object, before its commit marker
        stored.write_bytes(b"half written")
        with pytest.raises(WalError, match="another push of it is in progress"):
            wal_push(setup.config, "app", segment, locations)  # too fresh to be called dead
        aged = time.time() - STALE_PUSH - 1
        os.utime(stored, (aged, aged))
        wal_push(setup.config, "app", segment, locations)  # PostgreSQL's retry, later: replaces it
        fetched = fetch_bytes(setup.config, "app", name, locations, None, log=lambda m: None)
        assert fetched is not None and fetched[0] == data
    finally:
        setup.cleanup()


def test_two_backups_of_one_database_at_once_both_complete(pg, write_config, tmp_path):
    _filler(pg, rows=5000)
    path = write_config(pg, {"local": local_location(tmp_path / "repo")})
    home = _dagster_home(tmp_path)
    for env in ({}, {"DAGSTER_HOME": str(home)}):  # directly, and as jobs sharing the database's pool
        procs = [
            subprocess.Popen(
                [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "backup", "app"],
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    listed = json.loads(run_cli("--config", str(path), "backups", "list", "--json").stdout)["backups"]
    assert len(listed) == 4
    for b in listed:
        assert run_cli("--config", str(path), "backups", "verify", "app", b["id"]).returncode == 0


def test_s3_stopped_during_a_transfer_fails_it_in_seconds_and_keeps_the_local_copy(pg, write_config, tmp_path):
    import boto3

    _filler(pg)
    server = _own_server("s3")
    try:
        path = write_config(pg, {"local": local_location(tmp_path / "repo"), "s3": s3_location(server)})
        s3c = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        proc = subprocess.Popen(
            [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "backup", "app"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if s3c.list_multipart_uploads(Bucket=BUCKET).get("Uploads"):
                break  # parts are on their way
            time.sleep(0.02)
        assert proc.poll() is None, "the backup ended before S3 could be stopped mid-transfer"
        server.stop()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        after_stop = time.monotonic() - t0
        assert proc.returncode == 1 and "location 's3'" in err, err  # loud, naming the location
        print(f"S3 stopped mid-transfer: the backup failed it {after_stop:.1f}s later")
        assert after_stop < 20
        listed = json.loads(run_cli("--config", str(path), "backups", "list", "--json", "--location", "local").stdout)
        [kept] = listed["backups"]  # the local copy is complete and listed
        assert (
            run_cli("--config", str(path), "backups", "verify", "app", kept["id"], "--location", "local").returncode
            == 0
        )
    finally:
        server.stop()


@pytest.mark.parametrize("content", ["", "garbage\n", "AGE-SECRET-KEY-1NOTAKEY\n"])
def test_a_garbage_identity_is_a_clear_error_and_nothing_is_written(pg, write_config, age_key, tmp_path, content):
    path = write_config(
        pg,
        {"local": local_location(tmp_path / "repo")},
        {"method": "age", "recipients": [age_key.recipient], "identity_file": str(tmp_path / "id.txt")},
    )
    assert run_cli("--config", str(path), "backup", "app").returncode == 0
    (tmp_path / "id.txt").write_text(content)
    r = run_cli("--config", str(path), "restore", "app", "--latest", "--into", "app_copy")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "age identity" in r.stderr, r.stderr  # names what is wrong: the identity file
    with pg.connect() as conn:
        names = [row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert "app_copy" not in names and not [n for n in names if "__restoring_" in n]


def test_a_killed_base_backup_never_blocks_the_next(pg, tmp_path):
    setup = WalSetup(pg, encrypted=False)
    try:
        setup.enable_archiving()
        _filler(pg)
        proc = subprocess.Popen(
            [str(VENV_BIN / "dr-pipelines"), "--config", str(setup.config_path), "backup", "app", "--kind", "base"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        base_dir = setup.repo / "app" / "base"
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and proc.poll() is None
            and not _temp_files(base_dir if base_dir.exists() else setup.repo / "none")
        ):
            time.sleep(0.02)
        assert proc.poll() is None, "the base backup ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _temp_files(setup.repo)  # what the kill left
        again = setup.cli("backup", "app", "--kind", "base")
        assert again.returncode == 0, again.stderr
        assert "removed a leftover of a killed run" in again.stderr and _temp_files(setup.repo) == []
        listed = json.loads(setup.cli("backups", "list", "app", "--json").stdout)["backups"]
        assert [b["kind"] for b in listed] == ["base"]  # only the complete one
        assert setup.cli("backups", "verify", "app", listed[0]["id"]).returncode == 0
    finally:
        setup.cleanup()


def test_gcs_stopped_during_a_transfer_fails_it_in_seconds_and_keeps_the_local_copy(pg, write_config, tmp_path):
    _filler(pg)
    server = _own_server("gcs")
    repo = tmp_path / "repo"
    try:
        path = write_config(pg, {"local": local_location(repo), "gcs": gcs_location()})
        proc = subprocess.Popen(
            [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "backup", "app"],
            env={**os.environ, "STORAGE_EMULATOR_HOST": server.url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not _temp_files(repo):
            time.sleep(0.02)
        time.sleep(0.3)  # bytes are flowing to both locations
        assert proc.poll() is None, "the backup ended before GCS could be stopped mid-transfer"
        server.stop()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        after_stop = time.monotonic() - t0
        assert proc.returncode == 1 and "location 'gcs'" in err, err
        print(f"GCS stopped mid-transfer: the backup failed it {after_stop:.1f}s later")
        assert after_stop < 20
        listed = json.loads(run_cli("--config", str(path), "backups", "list", "--json", "--location", "local").stdout)
        [kept] = listed["backups"]
        verify = run_cli("--config", str(path), "backups", "verify", "app", kept["id"], "--location", "local")
        assert verify.returncode == 0, verify.stdout
    finally:
        server.stop()


def test_a_killed_pitr_leaves_its_server_and_a_confirmed_retry_replaces_it(pg, tmp_path):
    from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
    from dr_pipelines_tests.support.processes import reachable_tmpdir

    setup = WalSetup(pg, encrypted=False)
    root = reachable_tmpdir("drpt-pitr-kill-")
    data_dir, port = root / "data", free_port()
    try:
        setup.enable_archiving()
        assert setup.cli("backup", "app", "--kind", "base").returncode == 0
        with pg.connect("app") as conn:  # several segments to replay (1 MB each here), so the kill lands mid-replay
            conn.execute("CREATE TABLE after_base AS SELECT g, md5(g::text) AS h FROM generate_series(1, 60000) g")
        setup.switch_and_wait()
        cmd = [str(VENV_BIN / "dr-pipelines"), "--config", str(setup.config_path), "pitr", "app", "--latest"]
        proc = subprocess.Popen(
            [*cmd, "--data-dir", str(data_dir), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not (data_dir / "postmaster.pid").exists():
            time.sleep(0.01)
        assert proc.poll() is None, "the PITR ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the command only: its recovering server stays up, as after an OOM kill
        proc.wait()
        assert LocalCluster(data_dir, port).is_running()

        plain = setup.cli("pitr", "app", "--latest", "--data-dir", str(data_dir), "--port", str(free_port()))
        assert plain.returncode != 0 and "whose process died" in plain.stderr and "--overwrite --yes" in plain.stderr
        retry = setup.cli(
            "pitr",
            "app",
            "--latest",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--overwrite",
            "--yes",
            str(data_dir),
        )
        assert retry.returncode == 0, retry.stderr
        assert "stopping the server a killed recovery left running" in retry.stderr
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="app") as conn:
            assert conn.execute("SELECT count(*) FROM after_base").fetchone()[0] == 60000
        assert not (data_dir / ".dr_pitr_in_progress").exists()
        # a finished recovery is a server like any other: never stopped by a retry
        again = setup.cli(
            "pitr",
            "app",
            "--latest",
            "--data-dir",
            str(data_dir),
            "--port",
            str(free_port()),
            "--overwrite",
            "--yes",
            str(data_dir),
        )
        assert again.returncode != 0 and "belongs to a running PostgreSQL server" in again.stderr
    finally:
        LocalCluster(data_dir, port).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        setup.cleanup()


def test_a_killed_retention_leaves_every_listed_backup_whole_and_the_next_finishes(pg, write_config, tmp_path):
    repo = tmp_path / "repo"
    path = write_config(
        pg,
        {"local": local_location(repo)},
        retention={"daily_days": 0, "weekly_days": 0, "monthly_days": 0, "min_keep": 1},
    )
    ids = []
    for _ in range(4):
        r = run_cli("--config", str(path), "backup", "app")
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip().splitlines()[-1])
        time.sleep(1.1)
    # retention whose every delete takes a while, so it can be killed between a manifest and its objects
    script = (
        "import sys, time\n"
        "from dr_pipelines.core.storage import local\n"
        "real = local.LocalLocation.delete\n"
        "def slow(self, key):\n"
        "    real(self, key)\n"
        "    time.sleep(0.5)\n"
        "local.LocalLocation.delete = slow\n"
        "from dr_pipelines.cli.main import main\n"
        f"sys.exit(main(['--config', {str(path)!r}, 'retention', 'apply']))\n"
    )
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = repo / "app" / "logical" / ids[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and (first / "manifest.json").exists():
        time.sleep(0.01)
    assert proc.poll() is None, "retention ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(first.iterdir()), "the kill came after the objects were gone: nothing half-removed to test"
    listed = json.loads(run_cli("--config", str(path), "backups", "list", "--json").stdout)["backups"]
    assert ids[0] not in [b["id"] for b in listed]  # the manifest went first: the backup is gone as a whole
    for b in listed:  # and what is listed is whole
        assert run_cli("--config", str(path), "backups", "verify", "app", b["id"]).returncode == 0
    status = run_cli("--config", str(path), "status")
    assert "object without a manifest" in status.stdout
    again = run_cli("--config", str(path), "retention", "apply")
    assert again.returncode == 0, again.stderr
    assert "removed a leftover of a killed run" in again.stderr
    assert sorted(p.name for p in (repo / "app" / "logical").iterdir()) == [ids[-1]]
    restored = run_cli("--config", str(path), "restore", "app", "--latest", "--into", "app_copy")
    assert restored.returncode == 0, restored.stderr
    assert pg.table_checksums("app_copy") == pg.table_checksums("app")
