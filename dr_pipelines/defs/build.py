"""The one place that builds the `Definitions` from the DR config (one deployment, a fleet of
databases): each domain builds its own, and they are merged with the one resource they share.

`dr_pipelines.defs.definitions` is the module Dagster loads; the shell builds from here directly,
with the config it has already loaded, and only the domain of the job it runs: a fleet's other
definitions (every database's backup assets, jobs and checks) are start-up time a command does
not need (a test checks each job is the same either way)."""

from collections.abc import Callable, Sequence

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.backup.definitions import build_backup_definitions
from dr_pipelines.defs.files.definitions import build_files_definitions
from dr_pipelines.defs.monitoring.definitions import build_monitoring_definitions
from dr_pipelines.defs.pitr.definitions import build_pitr_definitions
from dr_pipelines.defs.recovery.definitions import build_recovery_definitions
from dr_pipelines.defs.resources import dr_resource
from dr_pipelines.defs.restore.definitions import build_restore_definitions
from dr_pipelines.defs.retention.definitions import build_retention_definitions
from dr_pipelines.defs.schedules import Defaults
from dr_pipelines.defs.wal.definitions import build_wal_definitions

DOMAINS = (
    build_backup_definitions,
    build_files_definitions,
    build_restore_definitions,
    build_wal_definitions,
    build_pitr_definitions,
    build_retention_definitions,
    build_monitoring_definitions,
    build_recovery_definitions,
)


Domain = Callable[[DrConfig, Defaults], dg.Definitions]


def build_definitions(config: DrConfig, config_file: str, domains: Sequence[Domain] = DOMAINS) -> dg.Definitions:
    defaults = Defaults.of(config)
    return dg.Definitions.merge(
        *(build(config, defaults) for build in domains),
        dg.Definitions(resources={"dr": dr_resource(config, config_file, sandbox=config.sandbox)}),
    )
