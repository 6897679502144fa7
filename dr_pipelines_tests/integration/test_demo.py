"""The README's first command: the sandbox demo ends with a backup visible in the Dagster UI."""

import json
import os
import subprocess
import time
import urllib.request

from dr_pipelines.core.postgres.cluster import free_port
from dr_pipelines_tests.support.processes import VENV_BIN, reachable_tmpdir, sandbox_ports, stop_process

QUERY = """{ assetOrError(assetKey: {path: ["soundhash", "logical_backup"]}) {
  ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { label } } } } }"""


DESCRIPTION = """{ assetOrError(assetKey: {path: ["files", "app", "snapshot"]}) {
  ... on Asset { definition { description } } } }"""


def _graphql(port: int, query: str = QUERY) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def test_demo_backup_visible_in_ui():
    # started in some directory, with no sandbox variable: the sandbox is that directory's .dr_sandbox,
    # and the UI's code server (started elsewhere) must serve that same sandbox
    workdir = reachable_tmpdir("drpt-sandbox-")
    sandbox = workdir / ".dr_sandbox"
    ui_port, pg_port = free_port(), sandbox_ports()
    env = {**os.environ, "DR_PIPELINES_SANDBOX_PORT": str(pg_port)}
    env.pop("DR_PIPELINES_SANDBOX_DIR", None)
    env.pop("DAGSTER_HOME", None)
    env.pop("DR_PIPELINES_CONFIG", None)
    log = open(workdir / "demo.log", "w+")  # noqa: SIM115 -- read after the demo stops
    proc = subprocess.Popen(
        [str(VENV_BIN / "dr-pipelines"), "demo", "--port", str(ui_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=str(workdir),
    )
    try:
        deadline = time.monotonic() + 240
        materializations = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                materializations = _graphql(ui_port)["data"]["assetOrError"]["assetMaterializations"]
                if materializations:
                    break
            except OSError:
                pass
            time.sleep(1)
        log.seek(0)
        output = log.read()
        assert materializations, f"no materialization visible in the UI; demo said:\n{output}"
        labels = {e["label"] for e in materializations[0]["metadataEntries"]}
        assert {"backup_id", "size_bytes", "duration_s"} <= labels
        assert "backup id:" in output and "age -d -i" in output and "pg_restore" in output
        assert "restore test PASSED" in output and "measured RTO" in output
        assert "point-in-time recovery PASSED" in output, output
        described = _graphql(ui_port, DESCRIPTION)["data"]["assetOrError"]["definition"]["description"]
        # the UI's definitions are the demo's sandbox (its file set's paths), not one of the UI's own directory
        assert str(sandbox.resolve() / "app_files") in described, described
        assert "file restore PASSED" in output and "drill PASSED" in output and "whole-system RTO" in output, output
    finally:
        stop_process(proc)
        from dr_pipelines.core.postgres.cluster import LocalCluster

        LocalCluster(sandbox / "pgdata", pg_port).stop("immediate")
        subprocess.run(["rm", "-rf", str(workdir)])
