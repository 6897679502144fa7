"""The whole-system scenarios as jobs of ops (SoundHash "Complete server failure", "Region failure";
SongNodes "Complete system failure", "Bad deployment", "Security breach / ransomware").

Every scenario shares the same ops after its first: restore_system_data (databases and file sets in
parallel) -> start_services_in_order -> recovery_report. Only the first op differs: how the source
and the point are chosen (full_system_recovery, cross_region_failover, ransomware_recovery).
"""

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import ConfigError, DrConfig, parse_duration
from dr_pipelines.core.monitoring.alerts import notify
from dr_pipelines.core.pitr.recover import parse_target_time
from dr_pipelines.core.recovery.failover import choose_failover
from dr_pipelines.core.recovery.plan import PlanRequest, RecoveryPlan, make_plan, preflight
from dr_pipelines.core.recovery.ransomware import (
    Incident,
    incident_time,
    judge_last_good,
    quarantine,
    rotation_checklist,
    what_changed,
)
from dr_pipelines.core.recovery.rollback import RollbackFailed, RollbackReport, service_rollback
from dr_pipelines.core.recovery.run import (
    SYSTEM_RECORDS,
    ComponentResult,
    RecoveryReport,
    begin,
    clear_killed_recovery,
    conclude,
    new_report,
    restore_data,
    run_drill,
    start_after_restore,
)
from dr_pipelines.core.repository.records import RecordKind, store_json_record
from dr_pipelines.defs.choices import chosen, with_choices
from dr_pipelines.defs.failures import domain_error, domain_failures
from dr_pipelines.defs.resources import DrResource

Method = Literal["auto", "pitr", "logical"]


class _SystemChoices(dg.Config):
    target_root: str = Field(
        description="A new or empty directory on this host: recovered clusters go to <target_root>/postgres/<db>, "
        "files to <target_root>/files/<set>/<their original paths>."
    )
    point_in_time: Optional[str] = Field(
        default=None,
        description="The one recovery point for the whole system, ISO 8601 with a time zone "
        "(e.g. 2026-11-23T10:15:00+00:00). Empty: the newest point.",
    )
    databases: Optional[list[str]] = Field(default=None, description="Only these databases. Empty: all configured.")
    file_sets: Optional[list[str]] = Field(default=None, description="Only these file sets. Empty: all configured.")
    method: Method = Field(
        default="auto",
        description="auto: PITR (base backup + WAL) when a base backup exists, else the newest logical backup; "
        "logical backups restore onto the configured server (the database must not exist or be empty there).",
    )
    files_in_place: bool = Field(
        default=False,
        description="Restore files to their original paths (an empty host: they must be absent or empty) "
        "instead of under target_root.",
    )
    start_services: bool = Field(
        default=True, description="Start the configured services in dependency order once the data is back."
    )
    accept_gaps: bool = Field(
        default=False,
        description="If the WAL archive has a gap, recover to the last point before it (it is refused otherwise).",
    )

    def plan_request(self, locations: Optional[list[str]] = None) -> PlanRequest:
        return PlanRequest(
            Path(self.target_root),
            at=parse_target_time(self.point_in_time) if self.point_in_time else None,
            databases=chosen(self.databases) or None,
            file_sets=chosen(self.file_sets) or None,
            method=self.method,
            files_in_place=self.files_in_place,
            start_services=self.start_services,
            accept_gaps=self.accept_gaps,
            locations=chosen(locations),
        )


class FullSystemConfig(_SystemChoices):
    locations: Optional[list[str]] = Field(
        default=None, description="Read only these locations. Empty: every location that answers (in config order)."
    )


class FailoverConfig(_SystemChoices):
    pass


class RansomwareConfig(dg.Config):
    target_root: str = Field(description="A NEW directory for the restored system: never the compromised one.")
    incident_time: Optional[str] = Field(
        default=None,
        description="When the attack began, ISO 8601 with a time zone. Empty: detected now, with lookback.",
    )
    lookback: str = Field(
        default="24h", description="With no incident_time: how long before now the attack may have begun."
    )
    databases: Optional[list[str]] = Field(default=None, description="Affected databases. Empty: all configured.")
    file_sets: Optional[list[str]] = Field(default=None, description="Affected file sets. Empty: all configured.")
    method: Method = Field(default="auto", description="As in full_system_recovery.")
    start_services: bool = Field(
        default=False, description="Start the services on the restored data (usually after the rotation checklist)."
    )


@dataclass
class RecoveryState:
    """What the shared ops hand on: the plan, the report being written, the components restored."""

    plan: RecoveryPlan
    report: RecoveryReport
    components: list[ComponentResult] = field(default_factory=list)


def _plan_metadata(context: dg.OpExecutionContext, plan: RecoveryPlan) -> None:
    context.add_output_metadata(
        {
            "plan": dg.MetadataValue.md("```\n" + plan.describe() + "\n```"),
            "point": plan.point,
            "locations_used": ", ".join(plan.locations),
        }
    )
    context.log.info(plan.describe())


def _ready(context: dg.OpExecutionContext, cfg: DrConfig, plan: RecoveryPlan, in_place: bool) -> RecoveryPlan:
    preflight(cfg, plan, in_place)
    _plan_metadata(context, plan)
    notify(
        cfg,
        f"recovery started: {plan.scenario}",
        plan.describe(),
        f"{plan.scenario} run {context.run_id}",
        context.log.info,
    )
    return plan


def _killed_before(context, cfg: DrConfig, root: str) -> list[str]:
    note = clear_killed_recovery(cfg, Path(root).expanduser().absolute(), context.log.info)
    return [note] if note else []


def plan_full_system_recovery(context: dg.OpExecutionContext, config: FullSystemConfig, dr: DrResource) -> RecoveryPlan:
    """Probe the locations, choose one recovery point for every database and file set, check the targets are empty,
    that there is room and the identity reads. Nothing is touched before this passes."""

    with domain_failures():
        cfg = dr.config()
        notes = _killed_before(context, cfg, config.target_root)
        plan = make_plan(
            cfg, dr.locations(cfg), "full_system_recovery", config.plan_request(config.locations), context.log.info
        )
        plan.notes += notes
        return _ready(context, cfg, plan, config.files_in_place)


def choose_failover_location(context: dg.OpExecutionContext, config: FailoverConfig, dr: DrResource) -> RecoveryPlan:
    """Probe every location; the first reachable one in config order that holds a recovery point covering the
    request is used alone. Says which, its region, and what it lacks against the others."""

    with domain_failures():
        cfg = dr.config()
        notes = _killed_before(context, cfg, config.target_root)
        plan = choose_failover(cfg, dr.locations(cfg), config.plan_request(), context.log.info)
        plan.notes += notes
        return _ready(context, cfg, plan, config.files_in_place)


def quarantine_and_choose_last_good(
    context: dg.OpExecutionContext, config: RansomwareConfig, dr: DrResource
) -> RecoveryPlan:
    """Quarantine first: the compromised files, data directory and server logs (or a dump) are captured, hashed and
    made read-only outside the repository. Then the last known good point: before the incident minus the margin,
    restore-tested, with a normal change rate; every newer point's rejection is said."""

    with domain_failures():
        cfg = dr.config()
        when = incident_time(
            parse_target_time(config.incident_time) if config.incident_time else None,
            parse_duration(config.lookback),
        )
        incident = Incident(
            when,
            chosen(config.databases) or list(cfg.databases),
            chosen(config.file_sets) or list(cfg.file_sets),
            cfg.recovery.incident_margin,
        )
        root = Path(config.target_root).expanduser().absolute()
        for name in incident.databases:  # fresh targets only: never the compromised ones
            pgdata = cfg.database(name).pgdata
            if pgdata and (root == Path(pgdata) or Path(pgdata) in root.parents or root in Path(pgdata).parents):
                raise ConfigError(
                    f"target_root {root} overlaps the compromised data directory {pgdata}: choose a new one"
                )
        locations = dr.locations(cfg)
        notes = _killed_before(context, cfg, config.target_root)
        quarantined = quarantine(cfg, incident, context.log.info)
        request = PlanRequest(
            root,
            at=incident.last_good_before,
            databases=incident.databases,
            file_sets=incident.file_sets,
            method=config.method,
            database_suffix=f"_recovered_{datetime.now(timezone.utc):%Y%m%d%H%M%S}",
            start_services=config.start_services,
        )
        plan = make_plan(
            cfg, locations, "ransomware_recovery", request, context.log.info, judge_last_good(cfg, locations)
        )
        plan.notes += notes
        plan.extra = {
            "incident_at": when.isoformat(),
            "last_good_before": incident.last_good_before.isoformat(),
            "quarantine": {
                "path": quarantined.path,
                "captured": quarantined.captured,
                "not_captured": quarantined.not_captured,
            },
            "changed_since_last_good": {
                f.file_set: what_changed(cfg, locations, f.file_set, f.snapshot_id) for f in plan.file_sets
            },
            "rotate": rotation_checklist(cfg, incident),
        }
        return _ready(context, cfg, plan, False)


@dg.op(
    description="Restore every database (PITR or logical) and file set of the plan at once, each from the "
    "chosen locations; a corrupt snapshot falls back to the next older one, and says so."
)
def restore_system_data(context: dg.OpExecutionContext, plan: RecoveryPlan, dr: DrResource) -> RecoveryState:
    cfg = dr.config()
    report = new_report(cfg, plan)
    with domain_failures():
        begin(cfg, plan)
    components = restore_data(
        cfg, dr.config_file, plan, dr.locations(cfg), context.log.info, datetime.fromisoformat(report.started_at)
    )
    report.steps_s["restore"] = round(
        (datetime.now(timezone.utc) - datetime.fromisoformat(report.started_at)).total_seconds(), 3
    )
    context.add_output_metadata(
        {c.component: f"{'ok' if c.ok else 'FAILED'}: {c.method} {c.point_id} in {c.seconds:.1f}s" for c in components}
    )
    return RecoveryState(plan, report, components)


@dg.op(
    description="Start the services in dependency order, each waiting for its health checks; the first that "
    "fails stops the start there, leaves the earlier ones running and says what to do."
)
def start_services_in_order(context: dg.OpExecutionContext, state: RecoveryState, dr: DrResource) -> RecoveryState:
    start_after_restore(dr.config(), state.plan, state.report, state.components, context.log.info)
    return state


@dg.op(
    description="The RTO of every step and the total, the data loss of every component, stored in the "
    "repository and as run metadata (stable keys: rto_s, data_loss_s), with a Markdown summary."
)
def recovery_report(context: dg.OpExecutionContext, state: RecoveryState, dr: DrResource) -> RecoveryReport:
    cfg = dr.config()
    report = conclude(state.plan, state.report, dr.locations(cfg), context.log.info)
    metadata = {
        "summary": dg.MetadataValue.md(report.summary_markdown()),
        "rto_s": report.rto_s or 0.0,
        "data_loss_s": report.data_loss_s if report.data_loss_s is not None else -1.0,
        "passed": report.passed,
        **({"extra": dg.MetadataValue.json(report.extra)} if report.extra else {}),
    }
    notify(
        cfg,
        f"recovery {'finished' if report.passed else 'FAILED'}: {report.scenario}",
        report.summary_markdown(),
        f"{report.scenario} run {context.run_id}",
        context.log.info,
        severity="info" if report.passed else "error",
    )
    if not report.passed:
        raise dg.Failure(description=report.error, metadata=metadata)
    context.add_output_metadata(metadata)
    return report


def _scenario_job(name: str, first, description: str) -> dg.JobDefinition:
    # in one process: the recovery's marker names the process that runs it, for as long as it runs
    @dg.job(name=name, tags={"dr/operation": "recovery"}, description=description, executor_def=dg.in_process_executor)
    def scenario():
        recovery_report(start_services_in_order(restore_system_data(first())))

    return scenario


class RollbackConfig(dg.Config):
    service: str = Field(description="The configured service to roll back.")
    before: str = Field(description="A moment before the deployment, ISO 8601 with a time zone.")
    with_database: bool = Field(default=False, description="Also restore its databases to before the deployment.")
    confirm: str = Field(description="Type the service's name again: its files (and databases) are replaced.")


def roll_back_service(context: dg.OpExecutionContext, config: RollbackConfig, dr: DrResource) -> RollbackReport:
    """Restore the service's files (and databases) from before the deployment, keep what was deployed aside,
    restart, health-check; if unhealthy, put the deployment back and fail loudly."""

    cfg = dr.config()
    locations = dr.locations(cfg)
    notify(
        cfg, f"rollback started: {config.service}", f"to before {config.before}", "service_rollback", context.log.info
    )
    try:
        with domain_failures():
            report = service_rollback(
                cfg,
                locations,
                config.service,
                parse_target_time(config.before),
                config.with_database,
                config.confirm,
                context.log.info,
            )
    except dg.Failure as failure:
        cause = domain_error(failure)
        if isinstance(cause, RollbackFailed):
            store_json_record(
                locations, SYSTEM_RECORDS, RecordKind.RECOVERY, cause.report.started_at, asdict(cause.report)
            )
        raise
    return report


@dg.op(description="Store the rollback's report; what was deployed is kept aside (listed).")
def rollback_report(context: dg.OpExecutionContext, report: RollbackReport, dr: DrResource) -> RollbackReport:
    cfg = dr.config()
    store_json_record(dr.locations(cfg), SYSTEM_RECORDS, RecordKind.RECOVERY, report.started_at, asdict(report))
    md = "\n".join(
        [f"### service_rollback of {report.service}: PASSED in {report.rto_s or 0:.1f} s", ""]
        + [f"- file set {k}: snapshot {v}" for k, v in report.snapshots.items()]
        + [f"- database {k}: backup {v}" for k, v in report.backups.items()]
        + [f"- kept aside: {k} -> {v}" for k, v in report.kept_aside.items()]
    )
    context.add_output_metadata({"summary": dg.MetadataValue.md(md), "rto_s": report.rto_s or 0.0})
    notify(cfg, f"rollback finished: {report.service}", md, "service_rollback", context.log.info)
    return report


@dg.op(
    description="The whole system restored into scratch targets (nothing running is touched), timed, "
    "checked, stored and removed: the whole-system RTO and RPO achieved, against the objectives."
)
def full_system_drill_op(context: dg.OpExecutionContext, dr: DrResource) -> RecoveryReport:
    cfg = dr.config()
    with domain_failures():
        report = run_drill(cfg, dr.config_file, dr.locations(cfg), context.log.info)
    metadata = {
        "summary": dg.MetadataValue.md(report.summary_markdown()),
        "rto_s": report.rto_s or 0.0,
        "data_loss_s": report.data_loss_s if report.data_loss_s is not None else -1.0,
        "rto_objective_s": cfg.recovery.rto.total_seconds(),
        "rpo_objective_s": cfg.recovery.rpo.total_seconds(),
        "passed": report.passed,
    }
    if not report.passed:
        raise dg.Failure(description=f"the full-system drill failed: {report.error}", metadata=metadata)
    context.add_output_metadata(metadata)
    return report


def _first_op(fn, config_class: type[dg.Config], output: type) -> dg.OpDefinition:
    """A scenario's first op, its Launchpad form restricted to the configured names (`with_choices`)."""

    def compute(context: dg.OpExecutionContext, config, dr: DrResource):
        return fn(context, config, dr)

    compute.__annotations__ = {
        "context": dg.OpExecutionContext,
        "config": config_class,
        "dr": DrResource,
        "return": output,
    }
    return dg.op(name=fn.__name__, description=" ".join((fn.__doc__ or "").split()))(compute)


def build_recovery_jobs(config: DrConfig) -> list[dg.JobDefinition]:
    names = {"databases": list(config.databases), "file_sets": list(config.file_sets)}
    full = with_choices(FullSystemConfig, locations=list(config.locations), **names)
    plan_full = _first_op(plan_full_system_recovery, full, RecoveryPlan)
    plan_failover = _first_op(choose_failover_location, with_choices(FailoverConfig, **names), RecoveryPlan)
    plan_ransomware = _first_op(quarantine_and_choose_last_good, with_choices(RansomwareConfig, **names), RecoveryPlan)
    roll_back = _first_op(
        roll_back_service, with_choices(RollbackConfig, service=list(config.services)), RollbackReport
    )

    @dg.job(
        executor_def=dg.in_process_executor,
        name="service_rollback",
        tags={"dr/operation": "recovery"},
        description="Roll one service back to before a deployment (SongNodes 'Bad deployment / rollback').",
    )
    def rollback():
        rollback_report(roll_back())

    @dg.job(
        executor_def=dg.in_process_executor,
        name="full_system_drill",
        tags={"dr/operation": "drill"},
        description="The weekly whole-system drill into scratch targets: RTO and RPO achieved.",
    )
    def drill():
        full_system_drill_op()

    return [
        _scenario_job(
            "full_system_recovery",
            plan_full,
            "Rebuild the whole system onto an empty host or target: databases and files to one consistent point, "
            "in parallel, then the services in order (SoundHash 'Complete server failure', SongNodes 'Complete "
            "system failure').",
        ),
        _scenario_job(
            "cross_region_failover",
            plan_failover,
            "Rebuild from the first reachable location that covers the request (SoundHash 'Region failure').",
        ),
        _scenario_job(
            "ransomware_recovery",
            plan_ransomware,
            "Quarantine, then the last known good point into fresh targets; what changed and what to rotate "
            "(SongNodes 'Security breach / ransomware').",
        ),
        rollback,
        drill,
    ]
