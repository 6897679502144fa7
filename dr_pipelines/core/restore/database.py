"""A whole logical restore in one call (the restore_database job spreads the same steps over ops):
staging database, validation, swap. The whole-system scenarios use it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import connect
from dr_pipelines.core.restore.fetch import Fetched
from dr_pipelines.core.restore.load import restore_into, scratch_directory
from dr_pipelines.core.restore.request import RestoreRequest, ValidationFailed
from dr_pipelines.core.restore.target import drop_database, plan_target, swap_in
from dr_pipelines.core.restore.validation import ValidationResult, validate_database
from dr_pipelines.core.storage.base import Location


@dataclass
class LogicalRestore:
    target: str
    fetched: Fetched
    validation: ValidationResult
    previous: str | None
    steps_s: dict[str, float]
    created: bool  # the target did not exist before (a new server, a new name)


def restore_logical(
    config: DrConfig, locations: dict[str, Location], request: RestoreRequest, log: Log
) -> LogicalRestore:
    """Load into a staging database, validate it, swap it in; a failure before the swap leaves the target
    as it was (and drops the staging database)."""
    db = config.database(request.database)
    plan = plan_target(config, request)
    assert plan.staging is not None, "the scenarios never load rows into a live database (data_only)"
    with scratch_directory(config, request.database) as work:
        fetched, steps = restore_into(config, locations, request, db, plan.staging, work, True, log)
    t0 = time.monotonic()
    with connect(db, request.database, dbname=plan.staging, autocommit=True) as conn:
        result = validate_database(conn, fetched.manifest, db.validation)
    steps["validate"] = round(time.monotonic() - t0, 3)
    if not result.passed:
        drop_database(db, request.database, plan.staging)
        raise ValidationFailed(result)
    t0 = time.monotonic()
    previous = swap_in(db, request.database, plan, request.keep_previous, log)
    steps["swap"] = round(time.monotonic() - t0, 3)
    return LogicalRestore(plan.target, fetched, result, previous, steps, not plan.exists)
