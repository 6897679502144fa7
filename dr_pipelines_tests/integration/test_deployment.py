"""The production deployment, run as docker/compose.yaml runs it but as plain processes on 127.0.0.1:
PostgreSQL for Dagster's storage (docker/dagster.yaml), the gRPC code server, `dagster-daemon run`
and `dagster-webserver`, each started with its service's command from the compose file. Nothing is
executed in-process: schedules fire because the daemon fires them, alerts arrive because the
daemon's sensors send them, runs queue because the daemon's coordinator holds them."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from dr_pipelines.core.owner import pid_alive
from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, free_port
from dr_pipelines.defs.dead_runs import RUN_OWNER, worker_pid
from dr_pipelines_tests.support.postgres import PgServer
from dr_pipelines_tests.support.processes import (
    PROJECT_ROOT,
    VENV_BIN,
    reachable_tmpdir,
    run_cli,
    wait_for,
    wait_for_port,
)
from dr_pipelines_tests.support.servers import AlertReceiver

DOCKER = PROJECT_ROOT / "docker"
BACKUP_JOB = "app__logical_backup_job"
BACKUP = dg.AssetKey(["app", "logical_backup"])
RESTORE_TEST = dg.AssetKey(["app", "restore_test"])
FAILURE, STARTED = dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.STARTED
NEVER = "0 0 1 1 *"  # what the test does not exercise stays out of the way


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def service_command(service: str, host: str, port: int | None, workspace: Path) -> list[str]:
    """The compose service's command, for this host: its executable from the venv, 127.0.0.1 for
    0.0.0.0, this test's port and workspace file."""
    command: list[str] = list(compose()["services"][service]["command"])
    mapped: dict[str, str] = {"0.0.0.0": host, "/opt/dagster/home/workspace.yaml": str(workspace)}
    out = [str(VENV_BIN / command[0])]
    for prev, arg in zip(command, command[1:], strict=False):
        out.append(str(port) if prev == "-p" and port is not None else mapped.get(arg, arg))
    return out


def wait_until(what: str, probe: Callable[[], object], timeout: float, every: float = 1.0) -> Any:
    """The probe's first truthy value (a run, a list of them, a pid), polled every second."""
    return wait_for(probe, what, timeout, every)


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    instance_pg: PgServer
    app_pg: PgServer
    receiver: AlertReceiver
    config_file: Path
    workspace: Path
    code_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, service: str) -> subprocess.Popen:
        port = {"user-code": self.code_port, "webserver": self.web_port}.get(service)
        with open(self.root / f"{service}.log", "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                service_command(service, "127.0.0.1", port, self.workspace),
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[service] = proc
        if port is not None:
            wait_for_port(port, timeout=120)
        return proc

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(service)
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass  # it had exited

    def log(self, service: str) -> str:
        path = self.root / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.web_port)

    def runs(self, instance: dg.DagsterInstance, **filters) -> list[dg.DagsterRun]:
        return [r.dagster_run for r in instance.get_run_records(filters=dg.RunsFilter(**filters))]

    def hooks(self) -> list[str]:
        return [b["text"] for b in self.receiver.bodies("/hook")]


def _server(pg_template: Path, root: Path) -> PgServer:
    root.mkdir()
    chown_to_postgres(root)
    subprocess.run(["cp", "-a", str(pg_template), str(root / "data")], check=True)
    cluster = LocalCluster(root / "data", free_port())
    cluster.start()
    return PgServer(cluster, root)


def instance_settings(poll_s: int) -> dict:
    """docker/dagster.yaml as shipped; only run monitoring looks more often, so a test need not wait
    the production interval for a dead run to be noticed."""
    settings = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    settings["run_monitoring"]["poll_interval_seconds"] = poll_s
    return settings


@pytest.fixture(scope="module")
def deployment(pg_template: Path) -> Iterator[Deployment]:
    with ExitStack() as cleanup:  # whatever fails on the way, what started is stopped
        yield from _deployment(pg_template, cleanup)


def _deployment(pg_template: Path, cleanup: ExitStack) -> Iterator[Deployment]:
    root = reachable_tmpdir("drpt-deploy-")
    instance_pg = _server(pg_template, root / "instance-pg")
    cleanup.callback(instance_pg.cluster.stop, "immediate")
    instance_pg.create_database("dagster", sample_data=False)
    app_pg = _server(pg_template, root / "app-pg")
    cleanup.callback(app_pg.cluster.stop, "immediate")
    app_pg.create_database("app")
    receiver = AlertReceiver().start()
    cleanup.callback(receiver.stop)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_settings(poll_s=5)))
    workspace = home / "workspace.yaml"
    workspace.write_text((DOCKER / "workspace.yaml").read_text())
    config_file = root / "dr.yaml"
    dr = {
        "databases": {
            "app": {
                "host": "127.0.0.1",
                "port": app_pg.port,
                "dbname": "app",
                "logical_backup": {"schedule": "* * * * *"},
                "base_backup": {"enabled": False, "schedule": NEVER},
                "restore_test": {"schedule": NEVER},
            },
            # Dagster's own storage, as docker/dr.template.yaml registers it
            "dagster": {
                "host": "127.0.0.1",
                "port": instance_pg.port,
                "dbname": "dagster",
                "logical_backup": {"schedule": NEVER},
                "base_backup": {"enabled": False, "schedule": NEVER},
                "restore_test": {"schedule": NEVER},
            },
        },
        "locations": {"local": {"type": "local", "path": str(root / "backups")}},
        "alerts": {"ops": {"type": "webhook", "url_env": "DR_ALERT_WEBHOOK_URL", "format": "generic"}},
        "schedules": {
            "running": True,
            "sensor_interval_s": 10,
            "health_checks": NEVER,
            "integrity": NEVER,
            "metrics": NEVER,
            "report": NEVER,
            "retention": NEVER,
        },
        "recovery": {"drill_schedule": NEVER},
    }
    config_file.write_text(yaml.safe_dump(dr, sort_keys=False))
    deployment = Deployment(root, {}, instance_pg, app_pg, receiver, config_file, workspace)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "DR_PIPELINES_"))}
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_PG_HOST="127.0.0.1",
        DAGSTER_PG_PORT=str(instance_pg.port),
        DAGSTER_PG_DB="dagster",
        DAGSTER_PG_USER="postgres",
        DAGSTER_PG_PASSWORD="trust-auth-ignores-it",
        DR_CODE_SERVER_HOST="127.0.0.1",
        DR_CODE_SERVER_PORT=str(deployment.code_port),
        DR_PIPELINES_CONFIG=str(config_file),
        DR_ALERT_WEBHOOK_URL=f"{receiver.url}/hook",
    )
    deployment.env = env
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the same instance
    try:
        deployment.start("user-code")
        deployment.start("daemon")
        deployment.start("webserver")
        yield deployment
    finally:
        try:
            with deployment.instance() as instance:  # shown by pytest when a test failed
                for r in instance.get_run_records(limit=30):
                    run = r.dagster_run
                    failure = [
                        e.message for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
                    ]
                    print("run", run.run_id[:8], run.job_name, run.status.value, dict(run.tags), failure)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            print("no run list:", e)
        for service in reversed(list(deployment.procs)):  # the code server last: the others call it
            deployment.kill(service, signal.SIGTERM)
        for service in ("user-code", "daemon", "webserver"):  # shown by pytest when a test failed
            lines = [line for line in deployment.log(service).splitlines() if " - " in line and "Traceback" not in line]
            print(f"==== {service} (last lines)", *lines[-40:], sep="\n")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _succeeded(d: Deployment, instance: dg.DagsterInstance, **filters) -> list[dg.DagsterRun]:
    return d.runs(instance, statuses=[dg.DagsterRunStatus.SUCCESS], **filters)


def test_the_schedule_fires_the_backup_and_the_restore_test_follows(deployment):
    d = deployment
    with d.instance() as instance:
        [run] = wait_until(
            "a logical backup launched by the daemon's schedule succeeded",
            lambda: _succeeded(
                d, instance, job_name=BACKUP_JOB, tags={"dagster/schedule_name": "app__logical_backup_schedule"}
            )[:1],
            timeout=180,
        )
        assert run.tags["dr/database"] == "app" and run.tags["dagster/max_retries"] == "2"
        [record] = instance.fetch_materializations(BACKUP, limit=1).records
        metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["size_bytes"].value > 0 and str(metadata["backup_id"].value).startswith("20")
        # the backup is in the repository, as the shell lists it
        listed = run_cli("backups", "list", "app", env=d.env)
        assert str(metadata["backup_id"].value) in listed.stdout, listed.stdout + listed.stderr
        # eager automation: the restore test follows the new backup, launched by the daemon
        tested = wait_until(
            "the automatic restore test of the new backup",
            lambda: instance.fetch_materializations(RESTORE_TEST, limit=1).records,
            timeout=180,
        )
        assert tested[0].asset_materialization.metadata["passed"].value is True  # type: ignore[union-attr]
    # the webserver serves the same instance
    status = d.client().get_run_status(run.run_id)
    assert status == dg.DagsterRunStatus.SUCCESS


def test_two_backups_of_one_database_launched_together_run_one_after_the_other(deployment):
    d = deployment
    client = d.client()
    ids = [client.submit_job_execution(BACKUP_JOB, tags={"test": "together"}) for _ in range(2)]
    with d.instance() as instance:
        runs = wait_until(
            "both launched backups ended",
            lambda: (
                rs := [instance.get_run_by_id(i) for i in ids],
                all(r is not None and r.is_finished for r in rs) and rs,
            )[1],
            timeout=240,
        )
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [_failures(instance, i) for i in ids]
        # every backup run of app (the schedule's too): none started before the previous one ended
        spans = sorted(
            (r.start_time, r.end_time, r.dagster_run.run_id)
            for r in instance.get_run_records(
                filters=dg.RunsFilter(job_name=BACKUP_JOB, statuses=[dg.DagsterRunStatus.SUCCESS])
            )
            if r.start_time and r.end_time
        )
        for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
            assert start >= end - 0.5, f"run {second} started before run {first} ended"
        queued = [
            e
            for i in ids
            for e in instance.all_logs(i)
            if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_ENQUEUED
        ]
        assert len(queued) == 2  # both went through the daemon's queue


def test_a_failing_backup_alerts_once_and_resolves_once(deployment):
    """The database stops: the schedule's run fails, run retries re-run it twice (three failures),
    and the run-failure sensor alerts once; when it comes back, one resolved notice."""
    d = deployment
    key = f"run:job {BACKUP_JOB}"

    def sent(event: str) -> list[dict]:
        return [b for b in d.receiver.bodies("/hook")[before:] if b["key"] == key and b["event"] == event]

    before = len(d.receiver.bodies("/hook"))
    stopped = datetime.now(timezone.utc)
    d.app_pg.cluster.stop("fast")
    try:
        with d.instance() as instance:
            failed = wait_until(
                "a backup and its two retries failed",
                lambda: (
                    len(runs := d.runs(instance, job_name=BACKUP_JOB, statuses=[FAILURE], created_after=stopped)) >= 3
                    and runs
                ),
                timeout=240,
            )
            assert any(r.tags.get("dagster/parent_run_id") for r in failed), "run retries did not re-run it"
        [alert] = wait_until("the failure alert", lambda: sent("trigger"), timeout=90)
    finally:
        d.app_pg.cluster.start()
    assert f"{BACKUP_JOB} failed" in alert["text"] and "is unreachable" in alert["text"], alert["text"]
    wait_until("the resolved notice", lambda: sent("resolve"), timeout=240)
    time.sleep(16)  # one more sensor tick (every 10 s, looked at every 5 s): nothing is sent twice
    assert len(sent("trigger")) == 1 and len(sent("resolve")) == 1, d.receiver.bodies("/hook")[before:]


def test_daemon_and_webserver_killed_and_restarted(deployment):
    """Neither holds a run: a run launched before the kill finishes, the schedule's next tick still
    fires after the daemon comes back, and the webserver serves again."""
    d = deployment
    run_id = d.client().submit_job_execution(BACKUP_JOB, tags={"test": "kill"})
    with d.instance() as instance:
        wait_until(
            "the run is running (STARTED: its process is up; a kill while STARTING is the start timeout's case)",
            lambda: (r := instance.get_run_by_id(run_id)) and r.status == dg.DagsterRunStatus.STARTED,
            120,
            0.2,
        )
        d.kill("daemon")
        d.kill("webserver")
        killed_at = time.time()
        d.start("webserver")
        d.start("daemon")
        done = wait_until("the run ended", lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r, 180)
        assert done.status == dg.DagsterRunStatus.SUCCESS, _failures(instance, run_id)
        wait_until(
            "a schedule tick after the restart",
            lambda: [
                r
                for r in d.runs(
                    instance, job_name=BACKUP_JOB, tags={"dagster/schedule_name": "app__logical_backup_schedule"}
                )
                if r.status == dg.DagsterRunStatus.SUCCESS
                and instance.get_run_record_by_id(r.run_id).create_timestamp.timestamp() > killed_at  # type: ignore[union-attr]
            ],
            timeout=150,
        )
    assert d.client().get_run_status(run_id) == dg.DagsterRunStatus.SUCCESS


def _step_span(instance: dg.DagsterInstance, run_id: str, first: str, last: str) -> tuple[float, float]:
    """From the start of step `first` to the end of step `last` (their event timestamps)."""
    times = {
        (e.step_key, e.dagster_event.event_type): e.timestamp
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.step_key in (first, last)
    }
    return times[(first, dg.DagsterEventType.STEP_START)], times[(last, dg.DagsterEventType.STEP_SUCCESS)]


def test_a_restore_over_the_live_database_never_runs_beside_its_backup(deployment):
    """On PostgreSQL storage, as the Launchpad launches it (no tags): the restore claims the database's
    pool before it stops the application and holds it to the swap, so a running backup of that
    database finishes first and no backup starts until the live database is back in place."""
    d = deployment
    before = d.app_pg.table_checksums("app")
    client = d.client()
    backup = client.submit_job_execution(BACKUP_JOB, tags={"test": "beside a restore"})
    with d.instance() as instance:
        wait_until(
            "the backup step started",
            lambda: any(
                e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_START
                for e in instance.all_logs(backup)
            ),
            120,
            0.1,
        )
        restore = client.submit_job_execution(
            "restore_database",
            run_config={"ops": {"choose_backup": {"config": {"database": "app", "clean": True, "confirm": "app"}}}},
        )
        runs = wait_until(
            "the backup and the restore ended",
            lambda: (
                (rs := [instance.get_run_by_id(i) for i in (backup, restore)])
                and all(r is not None and r.is_finished for r in rs)
                and rs
            ),
            timeout=300,
        )
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2, _failures(instance, restore)
        backup_start, backup_end = _step_span(instance, backup, "app__logical_backup", "app__logical_backup")
        live_start, live_end = _step_span(instance, restore, "stop_application", "swap_database")
        assert live_start >= backup_end or live_end <= backup_start, "the swap overlapped the backup"
        assert restore not in instance.event_log_storage.get_concurrency_info("pg_app").active_run_ids
    assert d.app_pg.table_checksums("app") == before  # the live database is the restored copy of itself


def _failures(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What the run's failure events and engine events said: the message of a failed assertion."""
    return [
        f"{e.dagster_event.event_type_value}: {e.message}"
        for e in instance.all_logs(run_id)
        if e.dagster_event
        and (e.dagster_event.is_failure or e.dagster_event.event_type == dg.DagsterEventType.ENGINE_EVENT)
    ]


def test_a_run_killed_with_its_code_server_is_failed_and_lists_no_backup(deployment):
    """kill -9 of the code server and the run it executes (what a restarted user-code container does):
    Dagster's run monitoring has no worker health check under the default launcher and would leave
    the run STARTED, holding the database's pool, forever. The dead-run watch of the restarted code
    server fails it; no half-written backup is listed, and the next backup runs (the slot is free)."""
    d = deployment
    # hold the backup midway, however fast the machine: pg_dump waits for its share lock on a table
    # this session holds exclusively, until the kill
    blocker = d.app_pg.connect("app")
    blocker.execute("CREATE TABLE IF NOT EXISTS held (n int)")
    blocker.autocommit = False
    blocker.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
    try:
        d.client().submit_job_execution(BACKUP_JOB, tags={"test": "kill -9"})
        with d.instance() as instance:
            # this one, or a scheduled one that took the database's queue slot first: both wait on the lock
            held = wait_until(
                "a backup held midway",
                lambda: [
                    r
                    for r in d.runs(instance, job_name=BACKUP_JOB, statuses=[STARTED])
                    if worker_pid(instance, r.run_id)
                ],
                120,
                0.2,
            )
            run_id = held[0].run_id
            worker: int = worker_pid(instance, run_id)  # type: ignore[assignment]  # found just above
            wait_until(
                "the dead-run watch knows the run's process",
                lambda: (r := instance.get_run_by_id(run_id)) and RUN_OWNER in r.tags,
                timeout=60,
            )
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED  # type: ignore[union-attr]
            killed_at = datetime.now(timezone.utc)
            d.kill("user-code")  # its process group: the proxy, the server, the run's process and its pg_dump
            if pid_alive(worker):
                os.kill(worker, signal.SIGKILL)
    finally:
        blocker.close()  # rolls back: the lock goes
    d.start("user-code")
    with d.instance() as instance:
        wait_until(
            "the dead-run watch marked the killed run failed",
            lambda: (r := instance.get_run_by_id(run_id)) and r.status == dg.DagsterRunStatus.FAILURE and r,
            timeout=120,
        )
        message = [e.message for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)]
        assert f"pid {worker}) is gone" in message[-1], message
        assert run_id not in instance.event_log_storage.get_concurrency_info("pg_app").active_run_ids
        # every backup the repository lists from before the kill is one a run completed (materialized):
        # the killed one is not. (Backups of app run one at a time, so none other was midway then.)
        materialized = {
            str(r.asset_materialization.metadata["backup_id"].value)  # type: ignore[union-attr]
            for r in instance.fetch_materializations(BACKUP, limit=1000).records
        }
    listed = listed_backups(d, before=killed_at)
    assert listed <= materialized, listed - materialized
    again = d.client().submit_job_execution(BACKUP_JOB, tags={"test": "after kill -9"})
    with d.instance() as instance:
        done = wait_until(
            "the next backup ended", lambda: (r := instance.get_run_by_id(again)) and r.is_finished and r, 240
        )
        assert done.status == dg.DagsterRunStatus.SUCCESS, _failures(instance, again)


def listed_backups(d: Deployment, db: str = "app", before: datetime | None = None) -> set[str]:
    from dr_pipelines.core.config import load_config
    from dr_pipelines.core.repository.catalog import load_catalog
    from dr_pipelines.core.storage.locations import open_locations

    config = load_config(d.config_file)
    entries = load_catalog(open_locations(config).values(), db, "logical").entries
    return {e.id for e in entries if before is None or e.manifest.created_at < before}


def test_the_instance_database_is_backed_up_and_restorable(deployment):
    d = deployment
    taken = run_cli("backup", "dagster", env=d.env)
    assert taken.returncode == 0, taken.stderr
    restored = run_cli("restore", "dagster", "--latest", "--into", "dagster_restored", env=d.env)
    assert restored.returncode == 0, restored.stderr
    with d.instance_pg.connect("dagster") as live, d.instance_pg.connect("dagster_restored") as copy:
        query = "SELECT count(*) FROM runs WHERE create_timestamp < %s"
        cutoff = copy.execute("SELECT max(create_timestamp) FROM runs").fetchone()[0]  # type: ignore[index]
        assert live.execute(query, (cutoff,)).fetchone() == copy.execute(query, (cutoff,)).fetchone()
        assert copy.execute("SELECT count(*) FROM runs").fetchone()[0] > 3  # type: ignore[index]


def test_instance_storage_down_at_start_is_a_clear_error(deployment, tmp_path):
    d = deployment
    env = {**d.env, "DAGSTER_PG_PORT": str(free_port())}
    proc = subprocess.run(
        service_command("daemon", "127.0.0.1", None, d.workspace),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Connection refused" in out and env["DAGSTER_PG_PORT"] in out, out[-2000:]


# --------------------------------------------------------------------------- the compose file


def test_compose_file_is_consistent_with_the_image_and_these_commands():
    spec = compose()
    services = spec["services"]
    assert {"dagster-postgres", "user-code", "webserver", "daemon", "app-postgres", "s3"} <= set(services)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    one_shot = {
        name
        for service in services.values()
        for name, needs in (service.get("depends_on") or {}).items()
        if needs.get("condition") == "service_completed_successfully"
    }
    assert one_shot == {"s3-bucket"}
    for name, service in services.items():
        if name in one_shot:  # runs once, then exits: retried on failure, no health to check
            assert service.get("restart") == "on-failure", f"{name}: not retried"
            continue
        assert service.get("restart") == "unless-stopped", f"{name}: no restart policy"
        assert "healthcheck" in service, f"{name}: no health check"
        for key in ("environment",):
            for var, value in (service.get(key) or {}).items():
                secretish = any(w in var for w in ("PASSWORD", "SECRET", "KEY", "TOKEN", "WEBHOOK"))
                assert not secretish or str(value).startswith("${") or str(value).startswith("/run/secrets/"), (
                    f"{name}: {var} is written in the compose file"
                )
        if service.get("image") == "dr_pipelines:latest":
            executable = service["command"][0]
            if executable not in ("monitored-postgres", "python"):
                assert (VENV_BIN / executable).exists(), f"{name}: {executable} is not an entry point of the image"
            check = service["healthcheck"]["test"]
            if check[0] == "CMD" and check[1].startswith(("dagster", "dr-pipelines")):
                assert (VENV_BIN / check[1]).exists(), f"{name}: health check {check[1]} missing"
    # the database host gets no private key and no other password than the archive's
    assert "age_identity" not in services["app-postgres"].get("secrets", [])
    assert not {"DR_AGE_IDENTITY_FILE", "DAGSTER_PG_PASSWORD"} & set(services["app-postgres"]["environment"])
    assert "COPY docker/monitored-postgres.sh" in dockerfile and (DOCKER / "monitored-postgres.sh").exists()
    for line in dockerfile.splitlines():
        assert "#" not in line or line.lstrip().startswith("#"), f"Dockerfile: a comment inside an instruction: {line}"
        if line.startswith("COPY") and "--from" not in line:
            for src in shlex.split(line)[1:-1]:
                assert (PROJECT_ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    # every volume and secret a service names is declared
    for name, service in services.items():
        for secret in service.get("secrets", []):
            assert secret in spec["secrets"], f"{name}: secret {secret} undeclared"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in spec["volumes"], f"{name}: volume {source} undeclared"
    # the code location the server serves is the one the other processes' workspace names
    assert "dr_pipelines.defs.definitions" in services["user-code"]["command"]
    assert (
        yaml.safe_load((DOCKER / "workspace.yaml").read_text())["load_from"][0]["grpc_server"]["location_name"]
        == "dr_pipelines"
    )


def test_the_example_dr_config_and_instance_settings_load(tmp_path):
    """docker/dr.template.yaml as init.sh writes it, and docker/dagster.yaml as Dagster parses it."""
    import pyrage

    from dr_pipelines.core.config import load_config

    recipient = str(pyrage.x25519.Identity.generate().to_public())
    written = tmp_path / "dr.yaml"
    written.write_text((DOCKER / "dr.template.yaml").read_text().replace("AGE_RECIPIENT", recipient))
    config = load_config(written)
    assert set(config.databases) == {"app", "dagster"} and config.databases["dagster"].dbname == "dagster"
    assert "AGE_RECIPIENT" in (DOCKER / "init.sh").read_text()

    from dagster._core.instance.config import dagster_instance_config

    settings = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    env = {
        "DAGSTER_PG_HOST": "h",
        "DAGSTER_PG_PORT": "5432",
        "DAGSTER_PG_DB": "d",
        "DAGSTER_PG_USER": "u",
        "DAGSTER_PG_PASSWORD": "p",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        parsed, _ = dagster_instance_config(str(home))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    limits = parsed["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "dr/database", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    assert parsed["run_monitoring"]["enabled"] and parsed["run_retries"]["enabled"]
