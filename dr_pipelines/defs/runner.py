"""Run the same Dagster jobs the UI launches from the command line, in the DAGSTER_HOME instance."""


import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.repository import Manifest
from dr_pipelines.defs.definitions import build_definitions, logical_backup_job_name
from dr_pipelines.defs.logical_backup import logical_backup_key


def _raise_failure(result: dg.ExecuteInProcessResult) -> None:
    from dr_pipelines.core.logical_backup import BackupFailed

    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            message = err.message.strip() if err else "step failed"
            # dg.Failure's description is the useful part; drop Dagster's class-name prefix
            raise BackupFailed(message.split(": ", 1)[1] if message.startswith(("dagster.", "Failure")) else message)
    raise BackupFailed(f"run {result.run_id} failed")


def materialize_logical_backup(config: DrConfig, db: str, config_file: str | None) -> Manifest:
    defs = build_definitions(config, config_file)
    job = defs.resolve_job_def(logical_backup_job_name(db))
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    if not result.success:
        _raise_failure(result)
    mat = result.asset_materializations_for_node(logical_backup_key(db).to_python_identifier())
    backup_id = mat[0].metadata["backup_id"].value
    from dr_pipelines.core.repository import load_catalog
    from dr_pipelines.core.storage import open_locations

    return load_catalog(open_locations(config).values(), db).find(db, backup_id).manifest
