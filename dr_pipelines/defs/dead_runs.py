"""Runs whose process died (kill -9, out of memory, a restarted code server or host): Dagster keeps
such a run STARTED, holding its pool slot, and every later run of that database would wait for the
slot forever. Run monitoring cannot see it with the default launcher (it has no worker health check),
so the runs carry their process, and a later run or the watch sensor fails those whose process is gone."""

import os
import socket
import sys

import dagster as dg
from dagster._core.launcher import DefaultRunLauncher

from dr_pipelines.core.owner import owner_dead, owner_tag, pid_alive

RUN_PID, RUN_HOST, RUN_OWNER = "dr/pid", "dr/host", "dr/owner"
DEAD_RUNS = "dr_dead_run_watch"
ACTIVE = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]


def fail_dead_runs(
    instance: dg.DagsterInstance, log=lambda m: print(m, file=sys.stderr), by: str = "the next run"
) -> list[str]:
    """Mark failed, and free the pool slots of, the runs of this host whose process is gone."""
    host = socket.gethostname()
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE, tags={RUN_HOST: host}))
    failed = []
    for record in records:
        run = record.dagster_run
        pid = int(run.tags.get(RUN_PID) or 0)
        dead = owner_dead(run.tags.get(RUN_OWNER)) if run.tags.get(RUN_OWNER) else (not pid_alive(pid) if pid else None)
        if not dead:
            continue
        # read again after finding the process gone: a run that ended normally wrote its end before its
        # process exited, and must not be failed over its own success
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in ACTIVE:
            continue
        instance.report_run_failed(
            run,
            message=f"the process that ran it ({host}, pid {pid}) is gone: killed, out of "
            f"memory or the host restarted. Marked failed by {by}; run the job again (a backup's "
            "leftovers are swept by the next one).",
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(
            f"run {run.run_id} of {run.job_name} was left STARTED by a process that died (pid {pid}): marked "
            "failed and its pool slot freed"
        )
        failed.append(run.run_id)
    return failed


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid the launched run's process reported ("Started process for run (pid: N).")."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        message = entry.message or ""
        if message.startswith("Started process for run (pid: "):
            return int(message.split("pid: ", 1)[1].rstrip(").").strip())
    return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _launched_here(pid: int, depth: int = 4) -> bool:
    """Whether `pid` descends from this process: the default launcher starts a run's process from the
    code server that evaluates this sensor. A run of another code location, replica or host never does."""
    me = os.getpid()
    for _ in range(depth):
        parent = _parent(pid)
        if parent is None or parent <= 1:
            return False
        if parent == me:
            return True
        pid = parent
    return False


def adopt_launched_runs(instance: dg.DagsterInstance) -> list[str]:
    """Tag the active runs this code server launched (from the daemon or the UI) with their process,
    as shell runs are tagged at launch: host, pid, boot and the process's start time, so a reused pid
    is never taken for it. Only live processes of this server are adopted; a run whose process died
    before its first look here stays with Dagster's own timeouts (run monitoring, `dagster/max_runtime`)."""
    adopted = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE)):
        run = record.dagster_run
        if RUN_HOST in run.tags:
            continue
        pid = worker_pid(instance, run.run_id)
        if pid is None or not pid_alive(pid) or not _launched_here(pid):
            continue
        instance.add_run_tags(
            run.run_id, {RUN_PID: str(pid), RUN_HOST: socket.gethostname(), RUN_OWNER: owner_tag(pid)}
        )
        adopted.append(run.run_id)
    return adopted


def build_dead_run_sensor(interval_s: int, status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    @dg.sensor(
        name=DEAD_RUNS,
        minimum_interval_seconds=interval_s,
        default_status=status,
        description="Fails the runs whose process died (kill -9, out of memory, a restarted code server) and "
        "frees their pool slots, so later backups of the database do not wait forever; the run-failure "
        "sensor then alerts.",
    )
    def dead_run_watch(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        instance = context.instance
        if not isinstance(instance.run_launcher, DefaultRunLauncher):
            return dg.SkipReason(
                f"runs are launched by {type(instance.run_launcher).__name__}: its own run monitoring watches them"
            )
        adopt_launched_runs(instance)
        failed = fail_dead_runs(instance, context.log.warning, by=f"the sensor {DEAD_RUNS}")
        return dg.SkipReason(f"failed {len(failed)} run(s) whose process died" if failed else "every active run lives")

    return dead_run_watch
