"""Logical backups against real PostgreSQL, S3 (moto) and GCS (emulator) servers."""

import json
import subprocess
import threading
import time
from pathlib import Path

import boto3
import pytest

from dr_pipelines.core.backup.attempts import BackupFailed, PartialBackup
from dr_pipelines.core.backup.logical import run_logical_backup
from dr_pipelines.core.config import ConfigError
from dr_pipelines.core.postgres.client import DatabaseUnreachable
from dr_pipelines.core.repository.catalog import load_catalog, verify_backup
from dr_pipelines.core.repository.manifest import MANIFEST
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines_tests.support.configs import BUCKET, config_from, local_location, s3_location
from dr_pipelines_tests.support.processes import reachable_tmpdir, run_cli
from dr_pipelines_tests.support.servers import start_moto

PG_RESTORE = "/usr/lib/postgresql/15/bin/pg_restore"


def restore_by_hand(obj: Path, identity: Path | None, pg, dbname: str) -> None:
    """The README's manual path: age -d | zstd -d | pg_restore, with the real binaries only."""
    pg.create_database(dbname, sample_data=False)
    decrypt = f"age -d -i {identity} {obj}" if identity else f"cat {obj}"
    cmd = (
        f"set -o pipefail; {decrypt} | zstd -d | {PG_RESTORE} --exit-on-error "
        f"-h 127.0.0.1 -p {pg.port} -U postgres -d {dbname}"
    )
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True)


def test_backup_to_three_locations_restores_by_hand(pg, three_locations, write_config, age_key, tmp_path):
    cfg = config_from(write_config(pg, three_locations, {"method": "age", "recipients": [age_key.recipient]}))
    source_counts = pg.row_counts("app")
    result = run_logical_backup(cfg, "app", open_locations(cfg))
    m = result.manifest
    assert result.locations == ["local", "s3", "gcs"]
    assert m.tables == source_counts and source_counts["public.fingerprints"] == 50000
    assert m.encryption == {"method": "age", "recipients": [m.encryption["recipients"][0]]}
    assert age_key.recipient not in m.to_json().decode()  # a fingerprint, not the key itself
    assert m.system_identifier and m.server_version.startswith("15")
    assert m.uncompressed_bytes > m.size_bytes > 0

    # each location alone lists the backup and verifies it (no Dagster instance involved)
    for name in ("local", "s3", "gcs"):
        only = open_locations(cfg, name)
        catalog = load_catalog(only.values(), "app")
        assert [e.id for e in catalog.entries] == [m.id]
        assert verify_backup(only[name], catalog.entries[0].manifest).ok

    # fetch from S3 and GCS with their own CLIs' libraries, then restore with age/zstd/pg_restore
    s3_obj = tmp_path / "from_s3.age"
    boto3.client("s3", endpoint_url=three_locations["s3"]["endpoint_url"], region_name="us-east-1").download_file(
        BUCKET, f"soundhash-backups/{m.object_key(m.objects[0].name)}", str(s3_obj)
    )
    restore_by_hand(s3_obj, age_key.identity_file, pg, "from_s3")
    assert pg.table_checksums("from_s3") == pg.table_checksums("app")

    local_obj = tmp_path / "backups" / m.object_key(m.objects[0].name)
    restore_by_hand(local_obj, age_key.identity_file, pg, "from_local")
    assert pg.row_counts("from_local") == source_counts


def test_unencrypted_gzip_backup_decodes_with_gunzip(pg, write_config, tmp_path):
    cfg = config_from(
        write_config(pg, {"local": local_location(tmp_path / "b")}, compression={"method": "gzip", "level": 1})
    )
    m = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    obj = tmp_path / "b" / m.object_key(m.objects[0].name)
    assert obj.name == "dump.pgdump.gz"
    plain = tmp_path / "dump.pgdump"
    subprocess.run(["bash", "-c", f"gunzip -c {obj} > {plain}"], check=True)
    toc = subprocess.run([PG_RESTORE, "-l", str(plain)], capture_output=True, text=True, check=True).stdout
    assert "TABLE DATA public fingerprints" in toc


def test_latest_is_by_manifest_time_not_name(pg, write_config, tmp_path):
    cfg = config_from(write_config(pg, {"local": local_location(tmp_path / "b")}))
    locs = open_locations(cfg)
    first = run_logical_backup(cfg, "app", locs).manifest
    second = run_logical_backup(cfg, "app", locs).manifest
    # rename the older backup so it sorts last by name: "latest" must still be the newer one
    root = tmp_path / "b" / "app" / "logical"
    renamed = "99999999T999999Z-zzzz"
    (root / first.id).rename(root / renamed)
    data = json.loads((root / renamed / MANIFEST).read_text())
    data["id"] = renamed
    (root / renamed / MANIFEST).write_text(json.dumps(data))
    catalog = load_catalog(locs.values(), "app")
    assert catalog.latest("app").id == second.id
    assert [e.id for e in catalog.entries] == [second.id, renamed]


def test_backup_without_manifest_is_invisible(pg, write_config, tmp_path):
    cfg = config_from(write_config(pg, {"local": local_location(tmp_path / "b")}))
    m = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    (tmp_path / "b" / m.object_key(MANIFEST)).unlink()
    assert load_catalog(open_locations(cfg).values(), "app").entries == []


def test_killed_pg_dump_leaves_no_backup(pg, three_locations, write_config, tmp_path):
    """The connection is killed mid-dump: the run fails and no location shows a backup."""
    with pg.connect("app") as conn:  # enough data that the dump takes a while
        conn.execute(
            "CREATE TABLE big AS SELECT g, md5(g::text) || repeat('x', 500) AS t FROM generate_series(1, 400000) g"
        )
    cfg = config_from(write_config(pg, three_locations))
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 60
        with pg.connect() as conn:
            while time.monotonic() < deadline and not killed.is_set():
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pg_dump' AND state = 'active' "
                    "AND query ILIKE 'COPY%big%'"
                ).fetchall()
                if rows:
                    killed.set()
                time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    with pytest.raises(BackupFailed, match=r"pg_dump of database 'app' failed .*nothing was stored"):
        run_logical_backup(cfg, "app", open_locations(cfg))
    t.join()
    assert killed.is_set()
    for name, loc in open_locations(cfg).items():
        keys = [o.key for o in loc.list()]
        # only the failed attempt's record (for the success rate), no backup object
        assert len(keys) == 1 and keys[0].startswith("app/reports/backup_attempt/"), f"{name} holds leftovers: {keys}"
        record = json.loads(loc.get_bytes(keys[0]))
        assert record["succeeded"] is False and "pg_dump of database 'app' failed" in record["error"]
    s3 = boto3.client("s3", endpoint_url=three_locations["s3"]["endpoint_url"], region_name="us-east-1")
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert [p.name for p in (tmp_path / "backups").rglob("*") if p.is_file()] == [keys[0].rsplit("/", 1)[1]]


def test_one_location_down_keeps_the_others(pg, gcs, write_config, age_key, tmp_path):
    """S3 is stopped: the run fails naming it, local and GCS keep complete, restorable copies."""
    doomed = start_moto()
    boto3.client("s3", endpoint_url=doomed.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    doomed.stop()
    s3_cfg = {**s3_location(doomed)}
    locations = {
        "local": local_location(tmp_path / "b"),
        "s3": s3_cfg,
        "gcs": {"type": "gcs", "bucket": BUCKET, "prefix": "p/", "project": "test"},
    }
    cfg = config_from(write_config(pg, locations, {"method": "age", "recipients": [age_key.recipient]}))
    with pytest.raises(PartialBackup) as e:
        run_logical_backup(cfg, "app", open_locations(cfg))
    assert e.value.failed.keys() == {"s3"}
    assert e.value.committed == ["local", "gcs"]
    assert "location 's3'" in str(e.value) and "FAILED on s3" in str(e.value)
    backup_id = e.value.manifest.id
    for name in ("local", "gcs"):
        only = open_locations(cfg, name)
        catalog = load_catalog(only.values(), "app")
        assert catalog.latest("app").id == backup_id
        assert verify_backup(only[name], catalog.latest("app").manifest).ok
    # listing every location reports S3 as a problem but still shows the backup
    catalog = load_catalog(open_locations(cfg).values(), "app")
    assert catalog.latest("app").locations == ["local", "gcs"]
    assert any("location 's3'" in p for p in catalog.problems)
    restore_by_hand(
        tmp_path / "b" / e.value.manifest.object_key(e.value.manifest.objects[0].name),
        age_key.identity_file,
        pg,
        "restored",
    )
    assert pg.table_checksums("restored") == pg.table_checksums("app")


def test_bit_flip_is_caught_by_verify(pg, write_config, tmp_path):
    path = write_config(pg, {"local": local_location(tmp_path / "b")})
    cfg = config_from(path)
    m = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    ok = run_cli("--config", str(path), "backups", "verify", "app", m.id)
    assert ok.returncode == 0 and "OK" in ok.stdout
    obj = tmp_path / "b" / m.object_key(m.objects[0].name)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    bad = run_cli("--config", str(path), "backups", "verify", "app", "--latest")
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout and "SHA-256" in bad.stdout


def test_truncated_object_is_caught(pg, write_config, tmp_path):
    cfg = config_from(write_config(pg, {"local": local_location(tmp_path / "b")}))
    m = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    obj = tmp_path / "b" / m.object_key(m.objects[0].name)
    obj.write_bytes(obj.read_bytes()[:1000])
    report = verify_backup(open_locations(cfg)["local"], m)
    assert not report.ok and "size 1000 bytes" in report.summary()
    obj.unlink()
    assert "missing" in verify_backup(open_locations(cfg)["local"], m).summary()


def test_unreachable_database_is_named(make_pg, write_config, tmp_path):
    server = make_pg()
    path = write_config(server, {"local": local_location(tmp_path / "b")})
    server.cluster.stop("immediate")
    with pytest.raises(DatabaseUnreachable, match=r"database 'app' \(postgres@127.0.0.1:\d+/app\) is unreachable"):
        run_logical_backup(config_from(path), "app", open_locations(config_from(path)))
    r = run_cli("--config", str(path), "backup", "app")
    assert r.returncode == 1 and "is unreachable" in r.stderr and "Traceback" not in r.stderr
    assert list((tmp_path / "b").rglob("manifest.json")) == []  # no backup, only the two failed attempts:
    attempts = [json.loads(p.read_text()) for p in (tmp_path / "b").rglob("*.json")]
    assert [a["succeeded"] for a in attempts] == [False, False] and "is unreachable" in attempts[0]["error"]


def test_bad_config_through_the_cli(write_config, pg, tmp_path, monkeypatch):
    path = write_config(pg, {"local": {"type": "local", "path": str(tmp_path / "b"), "compress": True}})
    r = run_cli("--config", str(path), "backup", "app")
    assert r.returncode == 2 and "locations.local.compress: unknown key" in r.stderr
    path = write_config(pg, {"local": local_location(tmp_path / "b")}, database={"password_env": "DR_TEST_NOPE"})
    monkeypatch.delenv("DR_TEST_NOPE", raising=False)
    r = run_cli("--config", str(path), "backup", "app")
    assert r.returncode == 2 and "DR_TEST_NOPE is not set" in r.stderr
    r = run_cli("--config", str(path), "backup", "nodb")
    assert r.returncode == 2 and "no database named 'nodb'" in r.stderr


SECRET = "s3cr3t-Pa55-do-not-leak"


def test_password_never_in_argv_logs_or_metadata(make_pg, write_config, tmp_path):
    """pg_dump is wrapped by a shim that records its argv; Dagster's event log is searched too."""
    import dagster as dg

    from dr_pipelines.defs.backup.assets import logical_backup_job_name
    from dr_pipelines.defs.build import build_definitions

    hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    pg = make_pg(hba=hba)
    pg.create_database("app")
    with pg.connect() as conn:
        conn.execute(f"CREATE ROLE backup LOGIN SUPERUSER PASSWORD '{SECRET}'")
    shim_dir = reachable_tmpdir("drpt-shim-")
    argv_log = shim_dir / "argv.log"
    for tool in ("pg_dump",):
        shim = shim_dir / tool
        shim.write_text(
            f'#!/bin/bash\nprintf "%s\\n" "$0" "$@" >> {argv_log}\n'
            f'[ -n "$PGPASSWORD" ] && echo "PGPASSWORD set" >> {argv_log}\n'
            f'exec /usr/lib/postgresql/15/bin/{tool} "$@"\n'
        )
        shim.chmod(0o755)
    path = write_config(
        pg,
        {"local": local_location(tmp_path / "b")},
        database={"user": "backup", "password_env": "DR_TEST_PW", "pg_bin_dir": str(shim_dir)},
    )
    import os

    os.environ["DR_TEST_PW"] = SECRET
    try:
        cfg = config_from(path)
        defs = build_definitions(cfg, str(path))
        instance = dg.DagsterInstance.ephemeral()
        result = defs.resolve_job_def(logical_backup_job_name("app")).execute_in_process(instance=instance)
        assert result.success
        logs = instance.all_logs(result.run_id)
        assert logs and all(SECRET not in str(e.user_message) + str(e.dagster_event) for e in logs)
        recorded = argv_log.read_text()
        assert "pg_dump" in recorded and "PGPASSWORD set" in recorded  # the password went by env
        assert SECRET not in recorded
        manifests = list((tmp_path / "b").rglob(MANIFEST))
        assert manifests and all(SECRET not in p.read_text() for p in manifests)
        # a wrong password: the error names the database, not the password
        os.environ["DR_TEST_PW"] = "wrong-" + SECRET
        with pytest.raises(DatabaseUnreachable) as e:
            run_logical_backup(config_from(path), "app", open_locations(config_from(path)))
        assert SECRET not in str(e.value) and "password authentication failed" in str(e.value)
    finally:
        os.environ.pop("DR_TEST_PW", None)


def test_unknown_location_is_named(pg, write_config, tmp_path):
    path = write_config(pg, {"local": local_location(tmp_path / "b")})
    with pytest.raises(ConfigError, match="no location named 'nas'"):
        open_locations(config_from(path), "nas")
