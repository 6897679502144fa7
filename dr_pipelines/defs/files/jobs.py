"""`restore_files`: a file snapshot restored from the Launchpad or the shell.

choose_snapshot -> restore_files -> (the report, as Markdown metadata and a record in the repository)
"""

from datetime import datetime, timezone
from typing import Optional

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files.format import records_owner
from dr_pipelines.core.files.restore import FileRestoreReport, choose_snapshot, restore_files
from dr_pipelines.core.pitr.recover import parse_target_time
from dr_pipelines.core.repository.records import RecordKind, store_json_record
from dr_pipelines.defs.choices import with_choices
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.resources import DrResource


class RestoreFilesConfig(dg.Config):
    file_set: str = Field(description="Which configured file set to restore (its name in the DR config).")
    snapshot: str = Field(default="latest", description="`latest`, or a snapshot id from `snapshots list`.")
    before: Optional[str] = Field(
        default=None, description="The newest snapshot taken at or before this time (ISO 8601 with a time zone)."
    )
    paths: list[str] = Field(default=[], description="Restore only these paths (and what is under them). Empty: all.")
    into: Optional[str] = Field(
        default=None,
        description="A new or empty directory; the snapshot's absolute paths are recreated below it. "
        "Default: a new directory /var/tmp/dr-files-restore-<set>-<snapshot>.",
    )
    in_place: bool = Field(default=False, description="Write over the original paths. Needs `confirm`.")
    confirm: Optional[str] = Field(
        default=None, description="With in_place: the set's paths, comma-separated, as the error message shows them."
    )
    location: Optional[str] = Field(default=None, description="Read only this location. Default: any that holds it.")


def build_restore_files_job(config: DrConfig) -> dg.JobDefinition:
    Choices = with_choices(RestoreFilesConfig, file_set=list(config.file_sets))

    @dg.op(out=dg.Out(dict), description="Pick the snapshot (by id, time or the newest) from the repository.")
    def choose_snapshot_to_restore(context: dg.OpExecutionContext, config: Choices, dr: DrResource) -> dict:  # type: ignore[valid-type]
        with domain_failures():
            cfg = dr.config()
            cfg.file_set(config.file_set)
            before = parse_target_time(config.before) if config.before else None
            entry = choose_snapshot(dr.locations(cfg, config.location), config.file_set, config.snapshot, before)
        context.log.info(
            f"snapshot {entry.id} of {config.file_set}, taken {entry.index.created_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        return {**config.model_dump(), "snapshot": entry.id, "before": None}

    @dg.op(out=dg.Out(FileRestoreReport), description="Restore, verify every file's SHA-256, record the report.")
    def restore_snapshot_files(context: dg.OpExecutionContext, request: dict, dr: DrResource) -> FileRestoreReport:
        with domain_failures():
            cfg = dr.config()
            locations = dr.locations(cfg, request["location"])
            into = request["into"] or f"/var/tmp/dr-files-restore-{request['file_set']}-{request['snapshot']}"
            report = restore_files(
                cfg,
                locations,
                request["file_set"],
                into,
                snapshot=request["snapshot"],
                paths=request["paths"],
                in_place=request["in_place"],
                confirm=request["confirm"],
                log=context.log.info,
            )
            report.data_loss_window_s = round(
                (datetime.now(timezone.utc) - datetime.fromisoformat(report.snapshot_created_at)).total_seconds(), 1
            )
            store_json_record(
                dr.locations(cfg),
                records_owner(report.file_set),
                RecordKind.RESTORE,
                report.started_at,
                vars(report),
                context.log.info,
            )
        context.add_output_metadata(
            {
                "summary": dg.MetadataValue.md(summary_markdown(report)),
                "snapshot_id": report.snapshot_id,
                "files": report.files,
                "bytes": report.bytes,
                "rto_s": report.rto_s,
                "data_loss_window_s": report.data_loss_window_s,
                "into": report.into,
            }
        )
        return report

    @dg.job(
        name="restore_files",
        description="Restore a file snapshot (all of it or some paths) into a new directory, or in place when "
        "confirmed; every file's SHA-256 verified; from any one surviving location.",
    )
    def restore_files_job():
        restore_snapshot_files(choose_snapshot_to_restore())

    del config
    return restore_files_job


def summary_markdown(r: FileRestoreReport) -> str:
    return "\n".join(
        [
            f"**Restored snapshot `{r.snapshot_id}` of file set `{r.file_set}`** (taken {r.snapshot_created_at})",
            "",
            "| | |",
            "|---|---|",
            f"| into | `{r.into}` |",
            f"| files | {r.files} ({r.bytes} bytes), every SHA-256 verified |",
            f"| read from | {', '.join(r.locations_used) or '-'} |",
            f"| RTO | {r.rto_s} s |",
            f"| data-loss window | {r.data_loss_window_s} s (changes after the snapshot) |",
        ]
    )
