"""Jobs launched the way the UI launches them: from the code location Dagster loads
(`dr_pipelines.defs.definitions`) with the embedded sandbox default and no config file.

PostgreSQL runs our restore_command inside the recovered data directory; a command that did not
name the sandbox's config would build a new, empty sandbox there and find no WAL (a defect found by
trying the demo's UI as a new user)."""

import importlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from dr_pipelines.core.pitr.recover import query_as_postgres
from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
from dr_pipelines_tests.support.processes import reachable_tmpdir, sandbox_ports


def _output_metadata(result: dg.ExecuteInProcessResult, step: str) -> dict:
    """What a step attached to its output: the UI shows it on the run's page."""
    [out] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == step]
    return dict(out.event_specific_data.metadata)  # type: ignore[union-attr]


def _failure(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.user_failure_data is not None:
            return event.step_failure_data.user_failure_data.description or ""
        if event.is_step_failure and event.step_failure_data.error is not None:
            return event.step_failure_data.error.message
    return ""


@pytest.fixture
def sandbox_defs(monkeypatch):
    """The definitions exactly as `dagster dev` / the code server load them, over a fresh sandbox."""
    sandbox = reachable_tmpdir("drpt-uipath-")
    monkeypatch.setenv("DR_PIPELINES_SANDBOX_DIR", str(sandbox))
    monkeypatch.setenv("DR_PIPELINES_SANDBOX_PORT", str(sandbox_ports()))
    monkeypatch.delenv("DR_PIPELINES_CONFIG", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    import dr_pipelines.defs.definitions as module

    module = importlib.reload(module)  # built from this test's environment
    yield sandbox, module.defs
    from dr_pipelines.sandbox.config import sandbox_cluster

    sandbox_cluster().stop("immediate")


def _archived(port: int) -> str:
    """Write rows after the base backup, then switch WAL and wait until the segment is archived."""
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="soundhash", autocommit=True) as conn:
        conn.execute("CREATE TABLE after_base (n int)")
        conn.execute("INSERT INTO after_base SELECT generate_series(1, 321)")
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]  # type: ignore[index]
            if done and done >= segment:
                return segment
            time.sleep(0.2)
    raise AssertionError(f"{segment} was not archived within 60 s")


def test_pitr_and_the_drill_launched_as_the_ui_does(sandbox_defs):
    sandbox, defs = sandbox_defs
    instance = dg.DagsterInstance.ephemeral()
    base = defs.resolve_job_def("soundhash__base_backup_job").execute_in_process(
        instance=instance, raise_on_error=False
    )
    assert base.success, _failure(base)
    from dr_pipelines.sandbox.config import config_and_file

    _archived(config_and_file()[0].databases["soundhash"].port)

    data_dir = reachable_tmpdir("drpt-uipath-pitr-") / "data"
    new_port = free_port()
    run_config = {
        "ops": {"recover_to_point": {"config": {"database": "soundhash", "data_dir": str(data_dir), "port": new_port}}}
    }
    result = defs.resolve_job_def("point_in_time_recovery").execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=False
    )
    try:
        assert result.success, _failure(result)
        # the recovered cluster holds what was written after the base backup, as the source does
        assert query_as_postgres(data_dir, new_port, "SELECT count(*) FROM after_base", "soundhash") == "321"
        auto = (data_dir / "postgresql.auto.conf").read_text()
        assert f"--config {sandbox / 'sandbox.yaml'}" in auto  # restore_command names the sandbox's config
        assert not list(data_dir.rglob("age-identity.txt"))  # no second sandbox was built in the data directory
        summary = str(_output_metadata(result, "validate_recovered")["summary"].value)
        assert "point-in-time recovery of `soundhash`: promoted" in summary and "| RTO |" in summary
        assert f"127.0.0.1:{new_port}" in summary and "| base backup used |" in summary
    finally:
        LocalCluster(data_dir, new_port).stop("immediate")

    drill = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(["soundhash", "pitr_test"])], raise_on_error=False
    )
    assert drill.success, _failure(drill)
    [evaluation] = drill.get_asset_check_evaluations()
    assert evaluation.passed, evaluation.description


def test_a_failed_pitr_names_the_cause_and_how_to_retry(sandbox_defs):
    sandbox, defs = sandbox_defs
    instance = dg.DagsterInstance.ephemeral()
    base = defs.resolve_job_def("soundhash__base_backup_job").execute_in_process(
        instance=instance, raise_on_error=False
    )
    assert base.success, _failure(base)
    manifest = next((sandbox / "backups" / "soundhash" / "base").glob("*/manifest.json"))
    first = json.loads(manifest.read_text())["extra"]["wal_start"]
    wal_dir = sandbox / "backups" / "soundhash" / "wal" / first[:8]
    for stored in wal_dir.glob(f"{first}*"):  # the base backup's first segment is lost everywhere
        stored.unlink()

    data_dir = reachable_tmpdir("drpt-uipath-fail-") / "data"
    run_config = {
        "ops": {
            "recover_to_point": {
                "config": {
                    "database": "soundhash",
                    "data_dir": str(data_dir),
                    "port": free_port(),
                    "target_time": datetime.now(timezone.utc).isoformat(),
                }
            }
        }
    }
    result = defs.resolve_job_def("point_in_time_recovery").execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=False
    )
    assert not result.success
    message = _failure(result)
    assert f"restore_command said: {first} is not in the WAL archive of 'soundhash' on any location" in message
    assert "? (LSN ?)" not in message and "none (replay never started)" in message
    assert f"overwrite: true and confirm: {data_dir}" in message
    shutil.rmtree(Path(data_dir).parent, ignore_errors=True)


def test_file_snapshots_and_restore_files_launched_as_the_ui_does(sandbox_defs):
    """The snapshot job of the sandbox's file set, then `restore_files` with only the set chosen:
    every other field of the Launchpad form has its default."""
    sandbox, defs = sandbox_defs
    instance = dg.DagsterInstance.ephemeral()
    snap = defs.resolve_job_def("files_app__snapshot_job").execute_in_process(instance=instance, raise_on_error=False)
    assert snap.success, _failure(snap)
    [test] = [e for e in snap.get_asset_check_evaluations() if e.check_name == "files_restore_test_passed"]
    assert test.passed, test.description
    result = defs.resolve_job_def("restore_files").execute_in_process(
        instance=instance,
        run_config={"ops": {"choose_snapshot_to_restore": {"config": {"file_set": "app"}}}},
        raise_on_error=False,
    )
    assert result.success, _failure(result)
    report = result.output_for_node("restore_snapshot_files")
    try:
        restored = Path(report.into) / str(sandbox / "app_files").lstrip("/")
        source = sandbox / "app_files" / "config" / "settings.yaml"
        assert (restored / "config" / "settings.yaml").read_bytes() == source.read_bytes()
        assert not (restored / "logs").exists() or not list((restored / "logs").glob("*.log"))  # excluded
        assert report.files > 0 and report.rto_s is not None
    finally:
        shutil.rmtree(report.into, ignore_errors=True)


def test_full_system_recovery_and_the_drill_launched_as_the_ui_does(sandbox_defs):
    """The Launchpad's form for full_system_recovery needs one field (target_root); the rest defaults.
    The sandbox's services start in order on the recovered data; the drill touches nothing running."""
    sandbox, defs = sandbox_defs
    instance = dg.DagsterInstance.ephemeral()
    for job in ("soundhash__base_backup_job", "files_app__snapshot_job", "files_secrets__snapshot_job"):
        result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
        assert result.success, _failure(result)
    from dr_pipelines.sandbox.config import config_and_file

    config = config_and_file()[0]
    _archived(config.databases["soundhash"].port)
    drill = defs.resolve_job_def("full_system_drill").execute_in_process(instance=instance, raise_on_error=False)
    assert drill.success, _failure(drill)
    drilled = drill.output_for_node("full_system_drill_op")
    assert drilled.passed and {c.component for c in drilled.components} == {
        "database/soundhash",
        "files/app",
        "files/secrets",
    }
    assert not [p for p in Path(config.recovery.drill_dir).glob("*")]  # its scratch targets are gone

    target = reachable_tmpdir("drpt-uipath-system-") / "rebuilt"
    result = defs.resolve_job_def("full_system_recovery").execute_in_process(
        instance=instance,
        run_config={"ops": {"plan_full_system_recovery": {"config": {"target_root": str(target)}}}},
        raise_on_error=False,
    )
    try:
        assert result.success, _failure(result)
        report = result.output_for_node("recovery_report")
        assert report.passed and [s.name for s in report.services] == ["api", "frontend"]
        [db] = [c for c in report.components if c.kind == "database"]
        port = int(db.where.rsplit(" ", 1)[-1])
        assert (
            query_as_postgres(target / "postgres" / "soundhash", port, "SELECT count(*) FROM after_base", "soundhash")
            == "321"
        )
        settings = sandbox / "app_files" / "config" / "settings.yaml"
        restored = target / "files" / "app" / str(settings).lstrip("/")
        assert restored.read_bytes() == settings.read_bytes()
        # the report op's output: a Markdown summary and the figures the UI plots, under stable keys
        metadata = _output_metadata(result, "recovery_report")
        assert "| database/soundhash |" in str(metadata["summary"].value) and float(metadata["rto_s"].value) > 0
    finally:
        from dr_pipelines.core.recovery.services import stop_services

        stop_services(config, ["api", "frontend"], lambda m: None)
        for data_dir in (target / "postgres").glob("*"):
            LocalCluster(data_dir, 0).stop("immediate")
        shutil.rmtree(target.parent, ignore_errors=True)
