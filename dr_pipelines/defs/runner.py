"""Run the same Dagster jobs the UI launches from the command line: in the DAGSTER_HOME instance
when it is set (so the run shows in the UI), else in an ephemeral one."""

import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import RunFailed
from dr_pipelines.core.owner import owner_tag
from dr_pipelines.core.pitr.recover import PitrReport
from dr_pipelines.core.repository.manifest import Manifest
from dr_pipelines.core.restore.report import RestoreReport
from dr_pipelines.defs.backup.assets import (
    base_backup_job_name,
    base_backup_key,
    logical_backup_job_name,
    logical_backup_key,
)
from dr_pipelines.defs.backup.definitions import build_backup_definitions
from dr_pipelines.defs.build import DOMAINS, Domain, build_definitions
from dr_pipelines.defs.dead_runs import RUN_HOST, RUN_OWNER, RUN_PID, fail_dead_runs
from dr_pipelines.defs.files.definitions import build_files_definitions
from dr_pipelines.defs.pitr.definitions import build_pitr_definitions
from dr_pipelines.defs.restore.definitions import build_restore_definitions
from dr_pipelines.defs.restore.restore_test import restore_test_job_name, restore_test_key


@contextmanager
def _instance():
    if os.environ.get("DAGSTER_HOME"):
        # Two commands opening a fresh instance at once race to create its SQLite tables (one fails
        # on "table ... already exists"): the first to take this lock creates them, the other waits.
        import fcntl

        lock_path = Path(os.environ["DAGSTER_HOME"]) / ".dr_pipelines.lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            instance = dg.DagsterInstance.get()
            instance.get_runs(limit=1)  # storage created and migrated while the lock is held
            fcntl.flock(lock, fcntl.LOCK_UN)
        with instance:
            yield instance
    else:
        yield dg.DagsterInstance.ephemeral()


def run_failure(result: dg.ExecuteInProcessResult) -> RunFailed:
    """The first failed step's own message (a domain error's, not Dagster's wrapper) and exit code."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            failure = data.user_failure_data
            if failure is not None and failure.description:
                code = failure.metadata.get("exit_code")
                return RunFailed(failure.description, int(code.value) if code is not None else 1)  # type: ignore[arg-type]
            return RunFailed(data.error.message.strip() if data.error else f"step {event.step_key} failed")
    return RunFailed(f"run {result.run_id} failed")


def _waiting_for(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """What the run waits for, if a step is blocked by its pool (another run of the database)."""
    pools = [
        entry.message.rsplit(" ", 1)[-1]
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if entry.message and "blocked by limit for pool" in entry.message
    ]
    if not pools:
        return None
    holders = instance.event_log_storage.get_concurrency_info(pools[-1]).active_run_ids - {run_id}
    return (
        f"waiting for pool {pools[-1]}: run {', '.join(sorted(holders)) or '(none)'} of the same database holds "
        "it. SIGTERM or Ctrl-C stops waiting"
    )


def _terminate_children() -> None:
    """SIGTERM to every process this one started (and theirs), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, seen = list(children.get(os.getpid(), [])), set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    for pid in seen:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


def _execute_watched(
    job: dg.JobDefinition, instance: dg.DagsterInstance, run_config: dict
) -> dg.ExecuteInProcessResult:
    """execute_in_process in a worker thread, so this (main) thread keeps its signal handlers: Dagster
    swaps SIGINT/SIGTERM for a flag nothing checks while a step waits for its pool, and the command
    could then be stopped only by kill -9. Says what it waits for; a signal fails the run, frees its
    pool slots and exits (what it leaves behind, the next run sweeps)."""
    from dagster._core.utils import make_new_run_id

    run_id = make_new_run_id()
    box: dict = {}
    stop: list[int] = []

    def work() -> None:
        try:
            box["result"] = job.execute_in_process(
                instance=instance,
                run_config=run_config,
                raise_on_error=False,
                run_id=run_id,
                tags={RUN_PID: str(os.getpid()), RUN_HOST: socket.gethostname(), RUN_OWNER: owner_tag()},
            )
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    previous = {
        sig: signal.signal(sig, lambda signum, _frame: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    worker = threading.Thread(target=work, name=f"run-{run_id[:8]}", daemon=True)
    worker.start()
    said, last_look = None, 0.0
    try:
        while worker.is_alive():
            worker.join(0.05)  # the command ends as soon as the run does
            if stop:
                run = instance.get_run_by_id(run_id)
                if run is not None and not run.is_finished:
                    instance.report_run_failed(run, message=f"stopped by signal {signal.Signals(stop[0]).name}")
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
                _terminate_children()  # pg_dump, pg_restore, age, tar...: none goes on alone
                print(
                    f"dr-pipelines: stopped by {signal.Signals(stop[0]).name}: run {run_id} marked failed",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(128 + stop[0])
            if time.monotonic() - last_look > 5:
                last_look = time.monotonic()
                waiting = _waiting_for(instance, run_id)
                if waiting and waiting != said:
                    print(waiting, file=sys.stderr, flush=True)
                said = waiting
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in box:
        raise box["error"]
    return box["result"]


class _ShellHandler(logging.Handler):
    """What a person at the shell reads: the steps' own messages, one line each. Dagster's event
    stream (stack traces of failed steps, "Dependencies for step ... not executed") stays in the
    run's log in the instance; the command prints the failure once, as the domain says it."""

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        message = meta.get("orig_message", record.getMessage())
        if meta.get("dagster_event") is not None or message.startswith("Dependencies for step"):
            return
        print(message, file=sys.stderr, flush=True)


def _shell_logger(_init_context) -> logging.Logger:
    log = logging.getLogger("dr_pipelines.shell")
    log.handlers = [_ShellHandler()]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


shell_logger = dg.LoggerDefinition(_shell_logger, description="Step messages only, on stderr (the shell's view).")


def run_job(
    config: DrConfig,
    config_file: str,
    job_name: str,
    run_config: dict | None = None,
    allow_failure: bool = False,
    domain: Domain | None = None,
):
    """Run `job_name`, built from its `domain` alone when given (the same job as in the whole
    deployment, without the start-up time of the rest)."""
    defs = build_definitions(config, config_file, (domain,) if domain else DOMAINS)
    job = defs.resolve_job_def(job_name).with_logger_defs({"shell": shell_logger})
    run_config = {**(run_config or {}), "loggers": {"shell": {}}}
    with _instance() as instance:
        fail_dead_runs(instance)
        result = _execute_watched(job, instance, run_config)
        if not result.success and not allow_failure:
            raise run_failure(result)
        return result


def materialize_logical_backup(config: DrConfig, db: str, config_file: str, label: str | None = None) -> Manifest:
    node = logical_backup_key(db).to_python_identifier()
    result = run_job(
        config,
        config_file,
        logical_backup_job_name(db),
        {"ops": {node: {"config": {"label": label}}}},
        domain=build_backup_definitions,
    )
    mat = result.asset_materializations_for_node(logical_backup_key(db).to_python_identifier())
    backup_id = str(mat[0].metadata["backup_id"].value)
    from dr_pipelines.core.repository.catalog import load_catalog
    from dr_pipelines.core.storage.locations import open_locations

    return load_catalog(open_locations(config).values(), db).find(db, backup_id).manifest


def restore_database(config: DrConfig, config_file: str, options: dict) -> RestoreReport:
    result = run_job(
        config,
        config_file,
        "restore_database",
        {"ops": {"choose_backup": {"config": options}}},
        domain=build_restore_definitions,
    )
    return result.output_for_node("restore_report")


def restore_test(config: DrConfig, config_file: str, db: str, backup: str, keep: bool) -> dict:
    node = restore_test_key(db).to_python_identifier()
    result = run_job(
        config,
        config_file,
        restore_test_job_name(db),
        {"ops": {node: {"config": {"backup": backup, "keep": keep}}}},
        allow_failure=True,
        domain=build_restore_definitions,
    )
    mats = result.asset_materializations_for_node(node)
    if not mats:  # failed before a verdict (no usable backup, server down): the step's message says why
        raise run_failure(result)
    md: dict = {k: v.value for k, v in mats[0].metadata.items()}
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            md["failure"] = evaluation.description or ""
            if "table_diff" in evaluation.metadata:
                md["failure"] += "\n" + str(evaluation.metadata["table_diff"].value)
    return md


def materialize_base_backup(config: DrConfig, db: str, config_file: str, label: str | None = None) -> str:
    node = base_backup_key(db).to_python_identifier()
    result = run_job(
        config,
        config_file,
        base_backup_job_name(db),
        {"ops": {node: {"config": {"label": label}}}},
        domain=build_backup_definitions,
    )
    [mat] = result.asset_materializations_for_node(base_backup_key(db).to_python_identifier())
    return str(mat.metadata["backup_id"].value)


def point_in_time_recovery(config: DrConfig, config_file: str, options: dict) -> PitrReport:
    result = run_job(
        config,
        config_file,
        "point_in_time_recovery",
        {"ops": {"recover_to_point": {"config": options}}},
        domain=build_pitr_definitions,
    )
    return result.output_for_node("validate_recovered")


def materialize_snapshot(config: DrConfig, file_set: str, config_file: str) -> str:
    """A file snapshot, then its restore test, as the schedule runs them."""
    from dr_pipelines.defs.files.assets import snapshot_job_name, snapshot_key

    result = run_job(config, config_file, snapshot_job_name(file_set), domain=build_files_definitions)
    [mat] = result.asset_materializations_for_node(snapshot_key(file_set).to_python_identifier())
    return str(mat.metadata["snapshot_id"].value)


def restore_files_job(config: DrConfig, config_file: str, options: dict):
    result = run_job(
        config,
        config_file,
        "restore_files",
        {"ops": {"choose_snapshot_to_restore": {"config": options}}},
        domain=build_files_definitions,
    )
    return result.output_for_node("restore_snapshot_files")
