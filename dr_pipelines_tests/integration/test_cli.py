"""`dr-pipelines backup`, `backups list`, `backups verify` as a user runs them."""

import json

import dagster as dg

from dr_pipelines_tests.support.configs import local_location
from dr_pipelines_tests.support.processes import reachable_tmpdir, run_cli


def test_backup_list_verify_from_each_location(pg, three_locations, write_config, age_key):
    path = write_config(pg, three_locations, {"method": "age", "recipients": [age_key.recipient]})
    r = run_cli("--config", str(path), "backup", "app")
    assert r.returncode == 0, r.stderr
    backup_id = r.stdout.strip()
    for name in ("local", "s3", "gcs"):
        r = run_cli("--config", str(path), "backups", "list", "app", "--location", name, "--json")
        assert r.returncode == 0, r.stderr
        listed = json.loads(r.stdout)["backups"]
        assert [b["id"] for b in listed] == [backup_id]
        assert listed[0]["locations"] == [name] and listed[0]["size_bytes"] > 0
        assert listed[0]["tables"]["public.videos"] == 2000
        r = run_cli("--config", str(path), "backups", "verify", "app", backup_id, "--location", name)
        assert r.returncode == 0 and f"{backup_id} on {name}: OK" in r.stdout
    r = run_cli("--config", str(path), "backups", "list")
    assert r.returncode == 0 and backup_id in r.stdout and "local,s3,gcs" in r.stdout


def test_verify_unknown_backup_lists_nearest(pg, write_config, tmp_path):
    path = write_config(pg, {"local": {"type": "local", "path": str(tmp_path / "b")}})
    backup_id = run_cli("--config", str(path), "backup", "app").stdout.strip()
    r = run_cli("--config", str(path), "backups", "verify", "app", backup_id[:-1] + "x")
    assert r.returncode == 1 and "not found; nearest: " + backup_id in r.stderr


def test_backup_is_recorded_in_dagster_home(pg, write_config, tmp_path):
    home = reachable_tmpdir("drpt-dh-")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    path = write_config(pg, {"local": {"type": "local", "path": str(tmp_path / "b")}})
    r = run_cli("--config", str(path), "backup", "app", env={"DAGSTER_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["app", "logical_backup"]))
    assert event.asset_materialization.metadata["backup_id"].value == r.stdout.strip()


def test_a_failed_job_prints_the_domain_error_once_without_a_traceback(pg, write_config, tmp_path):
    path = write_config(pg, {"local": local_location(tmp_path / "repo")})
    assert run_cli("--config", str(path), "backup", "app").returncode == 0
    refused = run_cli("--config", str(path), "restore", "app", "--latest", "--into", "copy", "--jobs", "0")
    assert refused.returncode == 2  # a request to fix, as if the step had run in the shell itself
    assert refused.stderr.count("dr-pipelines: error:") == 1 and "jobs must be at least 1" in refused.stderr
    missing = run_cli("--config", str(path), "restore", "app", "--backup", "20990101T000000Z-dead", "--into", "x")
    assert missing.returncode == 1 and missing.stderr.count("dr-pipelines: error:") == 1
    for r in (refused, missing):
        assert "Traceback" not in r.stderr and "Dependencies for step" not in r.stderr
        assert "STEP_FAILURE" not in r.stderr and len(r.stderr.splitlines()) < 15, r.stderr


def test_a_job_command_exits_quickly_and_leaves_no_temporary_files(pg, write_config, tmp_path):
    """Once Dagster is loaded, the command skips the interpreter's teardown (cli.main.run): its
    output is whole, its exit status kept, its work done, the atexit handlers run (a probe's, loaded
    through sitecustomize, writes a file) and nothing is left in TMPDIR."""
    path = write_config(pg, {"local": local_location(tmp_path / "repo")})
    tmp = reachable_tmpdir("drpt-tmpdir-")
    probe, ran = tmp_path / "probe", tmp_path / "atexit-ran"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        f"import atexit, pathlib\natexit.register(pathlib.Path({str(ran)!r}).write_text, 'ran')\n"
    )
    env = {"TMPDIR": str(tmp), "PYTHONPATH": str(probe)}
    backup = run_cli("--config", str(path), "backup", "app", env=env)
    assert backup.returncode == 0 and backup.stdout.strip(), backup.stderr
    assert ran.read_text() == "ran"
    ran.unlink()
    restored = run_cli("--config", str(path), "restore", "app", "--latest", "--into", "copy", env=env)
    assert restored.returncode == 0 and restored.stdout.startswith(f"restored {backup.stdout.strip()} into copy")
    assert ran.read_text() == "ran"
    assert pg.table_checksums("copy") == pg.table_checksums("app")
    assert list(tmp.iterdir()) == []
