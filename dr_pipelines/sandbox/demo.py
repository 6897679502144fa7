"""`dr-pipelines demo`: the sandbox end to end, then the Dagster UI on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dr_pipelines.core.config import LocalLocationConfig
from dr_pipelines.sandbox.config import config_and_file, ensure_sandbox_running, sandbox_dir

INSTANCE_SETTINGS = """# Instance settings for the demo's `dagster dev`
telemetry:
  enabled: false
nux:
  enabled: false
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 60
concurrency:
  runs:
    max_concurrent_runs: 4
  pools:
    default_limit: 1
"""


def _dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or sandbox_dir() / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # written, not copied: an installed package has no checkout beside it
        (home / "dagster.yaml").write_text(INSTANCE_SETTINGS)
    return home


def ui_environment() -> dict[str, str]:
    """`dagster dev`'s environment, without its two start-up notices that ask nothing of the user:
    "dev_command is superseded ... use 'dg dev'" (a FutureWarning; dg is not installed) and gRPC's
    "skipping fork() handlers" (the code server starts pg_ctl; the child execs at once)."""
    env = os.environ.copy()
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), "ignore::FutureWarning:click.core"]))
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return env


def run_demo(serve_ui: bool = True, port: int = 3000) -> int:
    os.environ.pop("DR_PIPELINES_CONFIG", None)  # the demo is the embedded sandbox, always
    # the UI's code server must find this sandbox whatever directory it starts in
    os.environ["DR_PIPELINES_SANDBOX_DIR"] = str(sandbox_dir())
    config, config_file = config_and_file(None)
    ensure_sandbox_running(config)
    os.environ["DAGSTER_HOME"] = str(_dagster_home())

    from dr_pipelines.defs.runner import materialize_logical_backup

    db = next(iter(config.databases))
    print(
        f"\n== taking a logical backup of the sandbox database '{db}' (Dagster job, recorded in "
        f"{os.environ['DAGSTER_HOME']})",
        flush=True,
    )
    manifest = materialize_logical_backup(config, db, config_file)
    location = next(iter(config.locations.values()))
    assert isinstance(location, LocalLocationConfig)  # the sandbox keeps its backups on local disk
    obj = Path(location.resolved_path(config.base_dir)) / manifest.object_key(manifest.objects[0].name)
    identity = config.encryption.identity_path()
    print(
        f"""
backup id:  {manifest.id}
object:     {obj}  ({manifest.size_bytes} bytes, sha256 {manifest.objects[0].sha256[:16]}...)
manifest:   {obj.parent / "manifest.json"}
tables:     {", ".join(f"{t}={n}" for t, n in manifest.tables.items())}

restore it by hand, without this project:
  age -d -i {identity} {obj} | zstd -d | pg_restore -h 127.0.0.1 -p {config.databases[db].port} -U postgres -d <new empty database>
list and verify backups:
  dr-pipelines backups list {db}
  dr-pipelines backups verify {db} --latest
""",
        flush=True,
    )
    from dr_pipelines.defs.runner import restore_test

    print(
        f"== restore test: restoring {manifest.id} into a scratch database and checking it against the manifest",
        flush=True,
    )
    md = restore_test(config, config_file, db, manifest.id, keep=False)
    print(
        f"restore test {'PASSED' if md['passed'] else 'FAILED'}: {md['tables']} tables, {md['rows']} rows, "
        f"measured RTO {md['rto_s']:.1f}s (objective {config.databases[db].objectives.rto})\n",
        flush=True,
    )
    pitr_ok = demo_pitr(config, config_file, db)
    files_ok = demo_files(config, config_file)
    drill_ok = demo_drill(config, config_file)
    if not serve_ui:
        return 0 if md["passed"] and pitr_ok is not False and files_ok and drill_ok else 1
    cluster = config.databases[db]
    print(
        f"== Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops it). The sandbox cluster keeps running on port "
        f"{cluster.port}; stop it with: su postgres -c '/usr/lib/postgresql/15/bin/pg_ctl -D {cluster.pgdata} stop'",
        flush=True,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",  # the installed module, not a workspace file: works from any directory and from a wheel
            "dr_pipelines.defs.definitions",
        ],
        cwd=str(sandbox_dir()),
        env=ui_environment(),
        start_new_session=True,
    )

    def stop(_signum, _frame):
        raise KeyboardInterrupt  # SIGTERM too: `dagster dev` runs in its own session and must be stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0


def _wait_archived(conn, segment: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < segment:
        if time.monotonic() > deadline:
            raise RuntimeError(f"WAL {segment} was not archived within {timeout}s; see the sandbox server log")
        time.sleep(0.2)


def demo_pitr(config, config_file: str, db: str) -> bool | None:
    """SoundHash scenario 2, "Accidental data deletion": base backup, a DELETE, recovery to just before it."""
    import time
    from datetime import datetime, timezone

    import psycopg

    from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
    from dr_pipelines.defs.runner import materialize_base_backup, point_in_time_recovery

    port = config.databases[db].port

    def connect(p: int):
        return psycopg.connect(host="127.0.0.1", port=p, user="postgres", dbname=db, autocommit=True)

    with connect(port) as conn:
        if conn.execute("SELECT current_setting('archive_mode')").fetchone()[0] == "off":
            print(
                "== point-in-time recovery skipped: this sandbox does not archive WAL (delete "
                f"{sandbox_dir()} to recreate it with archiving)\n",
                flush=True,
            )
            return None
    print("== point-in-time recovery (SoundHash 'Accidental data deletion'): a base backup first", flush=True)
    backup_id = materialize_base_backup(config, db, config_file)
    with connect(port) as conn:
        before = conn.execute("SELECT count(*) FROM processing_jobs").fetchone()[0]
        time.sleep(1)
        target = datetime.now(timezone.utc)
        time.sleep(1)
        deleted = conn.execute("DELETE FROM processing_jobs WHERE status = 'failed'").rowcount
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        _wait_archived(conn, segment)
    print(
        f"base backup {backup_id}; then at {target:%H:%M:%S} UTC someone deleted {deleted} processing_jobs rows",
        flush=True,
    )
    data_dir = sandbox_dir() / "pitr-demo" / "data"
    new_port = free_port()
    options = {
        "database": db,
        "data_dir": str(data_dir),
        "port": new_port,
        "target_time": target.isoformat(),
        "overwrite": True,
        "confirm": str(data_dir),
    }
    report = point_in_time_recovery(config, config_file, options)
    try:
        with connect(new_port) as conn:
            after = conn.execute("SELECT count(*) FROM processing_jobs").fetchone()[0]
    finally:
        LocalCluster(data_dir, new_port).stop("fast")
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    ok = after == before
    print(
        f"recovered to {report.reached_time} (LSN {report.reached_lsn}, timeline {report.timeline}) "
        f"in {report.rto_s or 0:.1f}s: processing_jobs has {after} rows again (before the deletion: {before}); "
        f"point-in-time recovery {'PASSED' if ok else 'FAILED'}\n",
        flush=True,
    )
    return ok


def demo_files(config, config_file: str) -> bool:
    """Application files: a snapshot, a change, a second snapshot that stores only the change, a restore."""
    import filecmp

    from dr_pipelines.core.files.catalog import load_snapshots
    from dr_pipelines.core.storage.locations import open_locations
    from dr_pipelines.defs.runner import materialize_snapshot, restore_files_job
    from dr_pipelines.sandbox.sample_files import app_files_dir

    root = app_files_dir(config.base_dir)
    print(f"== file snapshots of the application files ({root}) and the .env secrets set", flush=True)
    first = materialize_snapshot(config, "app", config_file)
    materialize_snapshot(config, "secrets", config_file)
    settings = root / "config" / "settings.yaml"
    settings.write_text(settings.read_text().replace("workers: 4", "workers: 8"))
    with open(root / "uploads" / "clip-000.ogg", "ab") as f:
        f.write(os.urandom(64_000))
    second = materialize_snapshot(config, "app", config_file)
    locations = open_locations(config)
    snaps = {e.id: e.index for e in load_snapshots(locations, "app").entries}
    for sid in (first, second):
        st = snaps[sid].stats
        print(
            f"snapshot {sid}: {st.files} files, {st.bytes_scanned} bytes scanned, {st.bytes_new} new, "
            f"{st.bytes_stored} stored, {st.changed_files + st.new_files} changed or new files, dedup {st.dedup_ratio}x",
            flush=True,
        )
    into = config.base_dir / f"restored-{second}"
    report = restore_files_job(config, config_file, {"file_set": "app", "snapshot": second, "into": str(into)})
    restored = into / str(root).lstrip("/")
    same = not filecmp.dircmp(root / "config", restored / "config").diff_files and filecmp.cmp(
        root / "uploads" / "clip-000.ogg", restored / "uploads" / "clip-000.ogg", shallow=False
    )
    print(
        f"restored {report.files} files into {into} in {report.rto_s:.1f}s: "
        f"file restore {'PASSED' if same else 'FAILED'} (the restored tree matches the live one)\n"
        f"  compare two snapshots:   dr-pipelines snapshots diff app {first} {second}\n"
        f"  restore one file:        dr-pipelines restore-files app --path {settings} --into /tmp/settings-restore\n",
        flush=True,
    )
    return same


def demo_drill(config, config_file: str) -> bool:
    """The weekly full-system drill, now: the database and every file set restored at once into scratch
    targets, measured against the whole system's objectives, then removed."""
    from dr_pipelines.defs.recovery.definitions import build_recovery_definitions
    from dr_pipelines.defs.runner import run_job

    print("== full-system drill: the database and the file sets restored in parallel into scratch targets", flush=True)
    report = run_job(config, config_file, "full_system_drill", domain=build_recovery_definitions).output_for_node(
        "full_system_drill_op"
    )
    for c in report.components:
        print(
            f"  {c.component:<20} {c.method} {c.point_id}: {c.seconds:.1f}s, data loss {c.data_loss_s or 0:.0f}s",
            flush=True,
        )
    print(
        f"whole-system RTO {report.rto_s:.1f}s (objective {config.recovery.rto}), data loss "
        f"{report.data_loss_s or 0:.0f}s (objective {config.recovery.rpo}): drill {'PASSED' if report.passed else 'FAILED'}\n"
        "  rebuild the whole system for real (services started in order):  dr-pipelines recover system --into DIR --plan\n",
        flush=True,
    )
    return report.passed
