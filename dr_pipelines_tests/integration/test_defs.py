"""The Dagster layer: definitions load, the asset materializes with stable metadata, failures fail."""

import dagster as dg
import pytest

from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines.defs.backup.assets import logical_backup_job_name
from dr_pipelines.defs.build import build_definitions
from dr_pipelines_tests.support.configs import BUCKET, config_from, local_location, s3_location
from dr_pipelines_tests.support.metadata import number
from dr_pipelines_tests.support.servers import start_moto

STABLE_KEYS = {
    "backup_id",
    "size_bytes",
    "duration_s",
    "compression_ratio",
    "sha256",
    "locations",
    "uncompressed_bytes",
    "tables",
    "rows",
    "created_at",
}


def test_sandbox_definitions_load(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_PIPELINES_SANDBOX_DIR", str(tmp_path / "sb"))
    monkeypatch.delenv("DR_PIPELINES_CONFIG", raising=False)
    from dr_pipelines.sandbox.config import config_and_file

    defs = build_definitions(*config_and_file())
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    backup = dg.AssetKey(["soundhash", "logical_backup"])
    assert dg.AssetKey(["soundhash", "database"]) in graph.get(backup).parent_keys
    schedule = defs.resolve_schedule_def("soundhash__logical_backup_schedule")
    assert schedule.cron_schedule == "0 */6 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # the sandbox starts quiet
    # but what only looks runs: the WAL observer (and the backup catalog it refreshes) and the health checks
    assert defs.resolve_sensor_def("dr_wal_archive_observer").default_status == dg.DefaultSensorStatus.RUNNING
    health = defs.resolve_schedule_def("dr_health_checks_schedule")
    assert health.default_status == dg.DefaultScheduleStatus.RUNNING


def test_a_command_runs_the_same_job_built_from_its_domain_alone(tmp_path, monkeypatch):
    """The shell builds only the domain of the job it runs (start-up time): every job, built so,
    has the same ops, assets, checks, tags and config schema as in the whole deployment."""
    from dagster._core.definitions.dependency import NodeHandle

    from dr_pipelines.defs.build import DOMAINS
    from dr_pipelines.sandbox.config import config_and_file

    monkeypatch.setenv("DR_PIPELINES_SANDBOX_DIR", str(tmp_path / "sb"))
    monkeypatch.delenv("DR_PIPELINES_CONFIG", raising=False)
    config, config_file = config_and_file()
    raw = config.model_dump(mode="json")
    raw["databases"]["second"] = raw["databases"]["soundhash"]  # a fleet: jobs of one database beside another's
    config = config.model_validate({**raw, "base_dir": config.base_dir, "sandbox": True})
    whole = build_definitions(config, config_file).get_repository_def()

    def shape(job: dg.JobDefinition) -> tuple:
        outputs = {
            name: sorted(  # an asset's outputs include its checks'
                (out, str(job.asset_layer.get_entity_key_for_node_output(NodeHandle(name, None), out)))
                for out in node.definition.output_dict
            )
            for name, node in job.graph.node_dict.items()
        }
        return (
            outputs,
            sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys),
            sorted(job.tags.items()),
            str(job.run_config_schema.run_config_schema_type.snapshot),
        )

    compared = 0
    for domain in DOMAINS:
        try:
            jobs = build_definitions(config, config_file, (domain,)).get_repository_def().get_all_jobs()
        except dg.DagsterInvalidDefinitionError:
            continue  # the monitoring domain's jobs select other domains' assets: never run alone by a command
        for job in jobs:
            if job.name.startswith("__ASSET_JOB"):
                continue
            assert shape(job) == shape(whole.get_job(job.name)), job.name
            compared += 1
    assert compared >= 12  # backups and restore tests of both databases, restores, PITR, files, recovery


def test_the_launchpad_offers_the_configured_names_and_refuses_others(tmp_path, monkeypatch):
    """The database, file set (...) fields are enums of the configured names: the Launchpad completes
    them, and a name that is not configured is refused before the run starts."""
    monkeypatch.setenv("DR_PIPELINES_SANDBOX_DIR", str(tmp_path / "sb"))
    monkeypatch.delenv("DR_PIPELINES_CONFIG", raising=False)
    from dr_pipelines.sandbox.config import config_and_file

    defs = build_definitions(*config_and_file())
    expected = {
        ("restore_database", "choose_backup", "database"): ["soundhash"],
        ("point_in_time_recovery", "recover_to_point", "database"): ["soundhash"],
        ("restore_files", "choose_snapshot_to_restore", "file_set"): ["app", "secrets"],
        ("service_rollback", "roll_back_service", "service"): ["api", "frontend"],
        ("full_system_recovery", "plan_full_system_recovery", "databases"): ["soundhash"],
        ("full_system_recovery", "plan_full_system_recovery", "file_sets"): ["app", "secrets"],
        ("full_system_recovery", "plan_full_system_recovery", "locations"): ["local"],
        ("cross_region_failover", "choose_failover_location", "databases"): ["soundhash"],
        ("ransomware_recovery", "quarantine_and_choose_last_good", "file_sets"): ["app", "secrets"],
    }
    for (job, op, field), names in expected.items():
        ops = defs.resolve_job_def(job).run_config_schema.config_type.fields["ops"].config_type  # type: ignore[attr-defined]
        fields = ops.fields[op].config_type.fields["config"].config_type.fields
        kind = fields[field].config_type
        kind = kind.inner_type if kind.kind.name == "NONEABLE" else kind  # Optional[...]
        kind = kind.inner_type if kind.kind.name == "ARRAY" else kind  # list[...]
        assert [v.config_value for v in kind.enum_values] == names, (job, field)
        assert fields[field].description  # the form explains the field
    with pytest.raises(dg.DagsterInvalidConfigError, match="soundhsah"):
        defs.resolve_job_def("restore_database").execute_in_process(
            run_config={"ops": {"choose_backup": {"config": {"database": "soundhsah"}}}},
            instance=dg.DagsterInstance.ephemeral(),
        )


def test_materialize_to_every_location(pg, three_locations, write_config, age_key):
    path = write_config(
        pg,
        three_locations,
        {"method": "age", "recipients": [age_key.recipient]},
        database={"logical_backup": {"schedule": "15 */4 * * *"}},
    )
    cfg = config_from(path)
    defs = build_definitions(cfg, str(path))
    dg.Definitions.validate_loadable(defs)
    schedule = defs.resolve_schedule_def("app__logical_backup_schedule")
    assert schedule.cron_schedule == "15 */4 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(logical_backup_job_name("app")).execute_in_process(instance=instance)
    assert result.success
    [mat] = result.asset_materializations_for_node("app__logical_backup")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md.keys() >= STABLE_KEYS
    catalog = load_catalog(open_locations(cfg).values(), "app")
    m = catalog.latest("app").manifest
    assert md["backup_id"] == m.id and md["size_bytes"] == m.size_bytes and md["sha256"] == m.objects[0].sha256
    assert md["locations"] == "local, s3, gcs"
    assert md["rows"] == sum(pg.row_counts("app").values())
    assert number(md["compression_ratio"]) > 1


def test_location_down_fails_the_run_naming_it(pg, write_config, tmp_path):
    doomed = start_moto()
    import boto3

    boto3.client("s3", endpoint_url=doomed.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    doomed.stop()
    path = write_config(pg, {"local": local_location(tmp_path / "b"), "offsite": s3_location(doomed)})
    defs = build_definitions(config_from(path), str(path))
    result = defs.resolve_job_def(logical_backup_job_name("app")).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "FAILED on offsite" in message and "location 'offsite'" in message
    # the local copy is complete and listed
    assert load_catalog(open_locations(config_from(path), "local").values(), "app").latest("app")


def test_unreachable_database_fails_the_run(make_pg, write_config, tmp_path):
    server = make_pg()
    path = write_config(server, {"local": local_location(tmp_path / "b")})
    server.cluster.stop("immediate")
    defs = build_definitions(config_from(path), str(path))
    result = defs.resolve_job_def(logical_backup_job_name("app")).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "is unreachable" in failure.step_failure_data.error.message


@pytest.mark.parametrize("running,expected", [(True, "RUNNING"), (False, "STOPPED")])
def test_schedule_status_from_config(pg, write_config, tmp_path, running, expected):
    path = write_config(pg, {"local": local_location(tmp_path / "b")}, schedules={"running": running})
    defs = build_definitions(config_from(path), str(path))
    assert defs.resolve_schedule_def("app__logical_backup_schedule").default_status.value == expected
