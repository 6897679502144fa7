"""No secret leaks: a database password, an S3 secret key and the age identity, each with a
recognisable marker, are looked for in every child process's argv and environment while a backup
and a restore run, in the Dagster instance's storage, in the repository and in all output."""

import os
import subprocess
import threading
import time
from pathlib import Path

import boto3
import pytest

from dr_pipelines_tests.support.configs import BUCKET, s3_location
from dr_pipelines_tests.support.processes import PROJECT_ROOT, VENV_BIN

pytestmark = pytest.mark.faults

DB_PASSWORD = "DBPASS-marker-5f1e"
ENV_VALUE = "ENVVALUE-marker-3c9d"  # a value in a secrets file set's .env
ENV_NAME = "credentials-marker-a41b.env"  # and its name: a secrets set's names never show either
S3_SECRET = "S3SECRET-marker-77ab"
OURS = {"pg_dump", "pg_restore", "psql", "pg_basebackup", "age", "zstd", "gzip", "tar", "postgres", "pg_ctl"}


def _tool(cmd: bytes) -> bytes:
    """The program a command line runs: the tool itself for `nice -n N tool ...` (a restore's
    decoding tools, seen before nice has exec'd them)."""
    words = cmd.split(b" ")
    if words[0].rsplit(b"/", 1)[-1] == b"nice" and len(words) > 3:
        words = words[3:]
    return words[0].rsplit(b"/", 1)[-1]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class ChildWatcher:
    """Reads /proc every few ms: argv and environment of every descendant of one process."""

    def __init__(self, root: int):
        self.root, self.seen, self.stop = root, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _descends(self, pid: int) -> bool:
        while pid > 1:
            if pid == self.root:
                return True
            pid = _parent(pid)
        return False

    def _run(self) -> None:
        while not self.stop.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == self.root or entry in self.seen:
                    continue
                try:
                    if self._descends(int(entry)):
                        with open(f"/proc/{entry}/cmdline", "rb") as c, open(f"/proc/{entry}/environ", "rb") as e:
                            self.seen[entry] = (c.read().replace(b"\0", b" "), e.read().replace(b"\0", b"\n"))
                except (OSError, ValueError, IndexError):
                    continue
            time.sleep(0.005)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return self.seen


def _run_watched(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.Popen(
        [str(VENV_BIN / "dr-pipelines"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watcher = ChildWatcher(proc.pid)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode()), watcher.finish()


def test_no_secret_in_children_instance_repository_or_output(pg, s3, write_config, age_key, tmp_path):
    identity = age_key.identity_file.read_text().strip()
    assert identity.startswith("AGE-SECRET-KEY-")
    location = {**s3_location(s3), "access_key_id_env": "DR_TEST_S3_KEY", "secret_access_key_env": "DR_TEST_S3_SECRET"}
    path = write_config(
        pg,
        {"offsite": location, "local": {"type": "local", "path": str(tmp_path / "repo")}},
        {"method": "age", "recipients": [age_key.recipient], "identity_file_env": "DR_AGE_IDENTITY_FILE"},
        database={"password_env": "DR_TEST_DB_PASSWORD"},
        files={"state_dir": str(tmp_path / "state")},
        file_sets={"env": {"paths": [str(tmp_path / "secrets")], "secrets": True}},
    )
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / ENV_NAME).write_text(f"API_TOKEN={ENV_VALUE}\n")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    env = {
        **os.environ,
        "DR_TEST_DB_PASSWORD": DB_PASSWORD,
        "DR_TEST_S3_KEY": "testing",
        "DR_TEST_S3_SECRET": S3_SECRET,
        "DR_AGE_IDENTITY_FILE": str(age_key.identity_file),
        "DAGSTER_HOME": str(home),
    }
    runs = [
        _run_watched(["--config", str(path), "backup", "app"], env),
        _run_watched(["--config", str(path), "restore", "app", "--latest", "--into", "app_copy"], env),
        _run_watched(["--config", str(path), "snapshot", "env"], env),  # with its restore test
        _run_watched(["--config", str(path), "restore-files", "env", "--into", str(tmp_path / "restored")], env),
    ]
    children: dict = {}
    for result, seen in runs:
        assert result.returncode == 0, result.stderr
        children.update(seen)
    names = {_tool(cmd) for cmd, _ in children.values()}
    assert {b"pg_dump", b"pg_restore", b"age", b"zstd"} <= names, names  # the scan saw the children
    for cmd, environ in children.values():
        tool = _tool(cmd).decode()
        for secret in (DB_PASSWORD, S3_SECRET, identity):
            assert secret.encode() not in cmd, f"{secret[:8]}... in the argv of {tool}"
        if tool not in OURS:
            continue  # e.g. Dagster's own `tail` capturing step output: its environment is Dagster's
        assert S3_SECRET.encode() not in environ, f"the S3 secret in the environment of {tool}"
        assert identity.encode() not in environ
        if tool not in ("pg_dump", "pg_restore", "psql", "pg_basebackup"):  # only libpq clients need it
            assert DB_PASSWORD.encode() not in environ, f"the database password in the environment of {tool}"

    def scan(where: str, data: bytes) -> None:
        for secret in (DB_PASSWORD, S3_SECRET, identity, ENV_VALUE, ENV_NAME):
            assert secret.encode() not in data, f"{secret[:8]}... in {where}"

    for result, _ in runs:
        scan("the output", (result.stdout + result.stderr).encode())
    for file in [*home.rglob("*"), *(tmp_path / "repo").rglob("*")]:  # instance storage, the repository
        if file.is_file():
            scan(str(file), file.read_bytes())
    s3c = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    for obj in s3c.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        scan(f"s3://{BUCKET}/{obj['Key']}", s3c.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
    assert Path(tmp_path / "repo").exists() and pg.table_checksums("app_copy") == pg.table_checksums("app")
    restored = tmp_path / "restored" / str(tmp_path / "secrets").lstrip("/") / ENV_NAME
    assert restored.read_text() == f"API_TOKEN={ENV_VALUE}\n"  # the scan above saw real work
