"""`dagster definitions validate` on the code location the README starts, as a user runs it."""

import os
import subprocess

from dr_pipelines_tests.support.processes import PROJECT_ROOT, VENV_BIN, reachable_tmpdir

ROOT = str(PROJECT_ROOT)


def test_dagster_definitions_validate():
    env = {**os.environ, "DR_PIPELINES_SANDBOX_DIR": str(reachable_tmpdir("drpt-validate-"))}
    env.pop("DR_PIPELINES_CONFIG", None)
    r = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All code locations passed validation" in r.stdout + r.stderr


def test_bad_config_fails_validation_naming_the_key(tmp_path):
    bad = tmp_path / "dr.yaml"
    bad.write_text("databases: {app: {dbname: x, prot: 1}}\nlocations: {l: {type: local, path: x}}\n")
    env = {**os.environ, "DR_PIPELINES_CONFIG": str(bad)}
    r = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "databases.app.prot: unknown key" in r.stdout + r.stderr
