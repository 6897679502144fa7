"""The restore_database job and test-restore, against real servers; data compared with the source."""

import http.server
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dr_pipelines.core.backup.logical import run_logical_backup
from dr_pipelines.core.errors import RunFailed
from dr_pipelines.core.repository.manifest import MANIFEST
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines.defs import runner
from dr_pipelines_tests.support.configs import config_from, local_location
from dr_pipelines_tests.support.metadata import number
from dr_pipelines_tests.support.processes import reachable_tmpdir, run_cli


@pytest.fixture
def setup(pg, write_config, age_key, tmp_path):
    """A backed-up `app` database; returns (config path, config, manifest)."""
    scratch = reachable_tmpdir("drpt-scratch-")

    def make(locations=None, encrypted=True, **database):
        locations = locations or {"local": local_location(tmp_path / "b")}
        enc = (
            {"method": "age", "recipients": [age_key.recipient], "identity_file": str(age_key.identity_file)}
            if encrypted
            else None
        )
        path = write_config(pg, locations, enc, database={"scratch_dir": str(scratch), **database})
        cfg = config_from(path)
        manifest = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
        return path, cfg, manifest

    make.scratch = scratch
    return make


def restore(cfg, path, **options):
    return runner.restore_database(cfg, str(path), {"database": "app", **options})


def databases(pg) -> set[str]:
    with pg.connect() as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")}


def sequences_and_indexes(pg, dbname: str) -> tuple[dict, set]:
    with pg.connect(dbname) as conn:
        sequences = dict(conn.execute("SELECT sequencename, last_value FROM pg_sequences").fetchall())
        indexes = {r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")}
    return sequences, indexes


def test_full_restore_over_a_corrupted_database(pg, setup):
    path, cfg, manifest = setup()
    before = pg.table_checksums("app")
    structure = sequences_and_indexes(pg, "app")
    assert structure[0] and structure[1]  # the sample has both: the comparison below means something
    with pg.connect("app") as conn:  # the disaster: rows deleted, a table dropped
        conn.execute("DELETE FROM fingerprints WHERE id % 3 = 0")
        conn.execute("DROP TABLE processing_jobs")
    report = restore(cfg, path, clean=True, confirm="app")
    assert pg.table_checksums("app") == before and sequences_and_indexes(pg, "app") == structure
    assert report.backup_id == manifest.id and report.passed and not report.fallback
    assert report.rto_s is not None and report.rto_s > 0
    assert report.data_loss_window_s is not None and report.data_loss_window_s >= 0
    assert report.previous_database.startswith("app__pre_restore_")
    # the damaged database is kept, not destroyed
    with pg.connect(report.previous_database) as conn:
        assert conn.execute("SELECT to_regclass('processing_jobs')").fetchone()[0] is None
    assert not any("__restoring_" in d for d in databases(pg))
    # the report lives in the repository too
    [stored] = load_reports(open_locations(cfg), "app", RecordKind.RESTORE)
    assert stored.backup_id == manifest.id and stored.rto_s == report.rto_s
    assert list(setup.scratch.iterdir()) == []  # no plaintext left behind
    # spooled, and loaded by parallel pg_restore as it decoded; then indexes and constraints
    assert report.steps_s["plaintext_bytes_on_disk"] == manifest.uncompressed_bytes
    assert report.steps_s["load"] > 0 and report.steps_s["post_data"] > 0 and "pg_restore" not in report.steps_s


def test_streamed_restore_keeps_table_data_off_disk(pg, setup):
    """restore_spool off: one stream feeds pg_restore; only the archive's head touches disk."""
    path, cfg, manifest = setup(restore_spool=False)
    with pg.connect("app") as conn:
        conn.execute("DELETE FROM fingerprints")
    report = restore(cfg, path, clean=True, confirm="app")
    assert pg.row_counts("app") == manifest.tables
    assert 0 < report.steps_s["plaintext_bytes_on_disk"] <= 1 << 20 < manifest.uncompressed_bytes
    assert report.steps_s["post_data"] > 0 and "pg_restore" not in report.steps_s
    assert list(setup.scratch.iterdir()) == []


def test_spool_falls_back_to_streaming_when_the_disk_is_short(setup, tmp_path):
    from dr_pipelines.core.restore.pg_restore import spool_fits

    _, cfg, manifest = setup()
    messages = []
    assert spool_fits(cfg.database("app"), tmp_path, manifest, messages.append)
    huge = manifest.model_copy(update={"uncompressed_bytes": 1 << 60})
    assert not spool_fits(cfg.database("app"), tmp_path, huge, messages.append)
    assert "streaming instead" in messages[-1] and "scratch_dir" in messages[-1]


def test_restore_into_new_database_from_the_shell(pg, setup, tmp_path):
    path, cfg, manifest = setup()
    r = run_cli("--config", str(path), "restore", "app", "--backup", manifest.id, "--into", "app_copy", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    assert f"restored {manifest.id} into app_copy" in r.stdout and "RTO" in r.stdout
    assert pg.table_checksums("app_copy") == pg.table_checksums("app")


def test_restore_from_s3_when_local_is_lost(pg, setup, s3, tmp_path):
    from dr_pipelines_tests.support.configs import s3_location

    path, cfg, manifest = setup({"local": local_location(tmp_path / "b"), "s3": s3_location(s3)})
    subprocess.run(["rm", "-rf", str(tmp_path / "b")], check=True)
    report = restore(cfg, path, target_database="from_s3")
    assert report.location == "s3"
    assert pg.table_checksums("from_s3") == pg.table_checksums("app")


@pytest.mark.parametrize(
    "options, load_step",
    [({}, "load"), ({"restore_while_decoding": False}, "pg_restore"), ({"restore_spool": False}, "fetch_and_load")],
    ids=["while-decoding", "verified-first", "streamed"],
)
def test_corrupt_latest_falls_back_loudly(pg, setup, tmp_path, options, load_step):
    path, cfg, first = setup(**options)
    with pg.connect("app") as conn:
        conn.execute("INSERT INTO processing_jobs (job_type, status) VALUES ('x', 'pending')")
    second = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    obj = tmp_path / "b" / second.object_key(second.objects[0].name)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    report = restore(cfg, path, target_database="fell_back")
    assert report.backup_id == first.id and report.fallback
    assert second.id in report.fallback_reasons[0] and "checksum mismatch" in report.fallback_reasons[0]
    assert pg.row_counts("fell_back") == first.tables and report.steps_s[load_step] > 0
    # asking for that backup by id fails instead of falling back
    with pytest.raises(RunFailed, match=f"backup {second.id} cannot be used: local: checksum mismatch"):
        restore(cfg, path, backup=second.id, target_database="not_this")
    assert "not_this" not in databases(pg)
    assert not any("__restoring_" in d for d in databases(pg))  # the half-loaded staging copy is gone


def test_backup_id_not_found_lists_nearest(pg, setup):
    path, cfg, manifest = setup()
    r = run_cli("--config", str(path), "restore", "app", "--backup", manifest.id[:-2] + "zz", "--into", "x")
    assert r.returncode == 1
    assert "not found; nearest: " + manifest.id in r.stderr


def test_missing_and_wrong_identity(pg, setup, write_config, age_key, tmp_path, monkeypatch):
    import pyrage

    path, cfg, manifest = setup()
    fingerprint = manifest.encryption["recipients"][0]
    locations = {"local": local_location(tmp_path / "b")}
    monkeypatch.delenv("DR_AGE_IDENTITY_FILE", raising=False)
    no_key = write_config(
        pg, locations, {"method": "age", "recipients": [age_key.recipient], "identity_file_env": "DR_AGE_IDENTITY_FILE"}
    )
    with pytest.raises(RunFailed, match=f"set DR_AGE_IDENTITY_FILE.*fingerprint {fingerprint}"):
        restore(config_from(no_key), no_key, target_database="nokey")
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(str(pyrage.x25519.Identity.generate()) + "\n")
    monkeypatch.setenv("DR_AGE_IDENTITY_FILE", str(wrong))
    with pytest.raises(RunFailed, match=f"cannot decrypt.*recipient fingerprint\\(s\\) {fingerprint}"):
        restore(config_from(no_key), no_key, backup=manifest.id, target_database="wrongkey")
    assert not {"nokey", "wrongkey"} & databases(pg)
    assert list(Path("/tmp").glob("dr-restore-*")) == []  # that config has no scratch_dir: the default


def test_refusals_touch_nothing(pg, setup):
    path, cfg, manifest = setup()
    pg.create_database("busy")
    before = pg.table_checksums("busy")
    with pytest.raises(RunFailed, match="'busy' exists and is not empty: set clean: true and confirm: 'busy'"):
        restore(cfg, path, target_database="busy")
    with pytest.raises(RunFailed, match="confirm: 'busy'"):
        restore(cfg, path, target_database="busy", clean=True, confirm="bsuy")
    with pytest.raises(RunFailed, match="is the source database 'app' itself"):
        restore(cfg, path)
    with pytest.raises(RunFailed, match="mutually exclusive"):
        restore(cfg, path, target_database="x", schema_only=True, data_only=True)
    assert pg.table_checksums("busy") == before
    r = run_cli("--config", str(path), "restore", "app", "--latest", "--schema-only", "--data-only")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = run_cli("--config", str(path), "restore", "app", "--latest", "--clean")
    assert r.returncode == 2 and "add --yes" in r.stderr


def test_target_server_down(make_pg, setup, pg):
    path, cfg, _ = setup()
    pg.cluster.stop("immediate")
    with pytest.raises(RunFailed, match=r"database 'app' \(postgres@127.0.0.1:\d+/postgres\) is unreachable"):
        restore(cfg, path, target_database="anywhere")


def test_validation_mismatch_fails_with_diff_and_keeps_target(pg, setup, tmp_path):
    path, cfg, manifest = setup(
        validation={
            "zero_row_queries": {
                "orphaned_videos": "SELECT v.id FROM videos v LEFT JOIN channels c ON c.id = v.channel_id WHERE c.id IS NULL"
            }
        }
    )
    manifest_file = tmp_path / "b" / manifest.object_key(MANIFEST)
    data = json.loads(manifest_file.read_text())
    data["tables"]["public.fingerprints"] = 50001  # the manifest says one more row than the dump holds
    manifest_file.write_text(json.dumps(data))
    pg.create_database("prod_copy")
    before = pg.table_checksums("prod_copy")
    with pytest.raises(RunFailed) as e:
        restore(cfg, path, target_database="prod_copy", clean=True, confirm="prod_copy")
    assert "| public.fingerprints | 50001 | 50000 |" in str(e.value)
    assert "The target 'prod_copy' was not touched" in str(e.value)
    assert pg.table_checksums("prod_copy") == before
    assert not any("__restoring_" in d for d in databases(pg))
    # the shell's test-restore says FAILED and shows the diff
    r = run_cli("--config", str(path), "test-restore", "app")
    assert r.returncode == 1 and "FAILED" in r.stdout and "| public.fingerprints | 50001 | 50000 |" in r.stderr


def test_validation_queries_and_migrations(pg, setup):
    with pg.connect("app") as conn:
        conn.execute("ALTER TABLE videos DROP CONSTRAINT videos_channel_id_fkey")
        conn.execute("INSERT INTO videos (video_id, channel_id, title) VALUES ('orphan', 999999, 't')")
    path, cfg, _ = setup(
        validation={
            "required_tables": ["channels", "public.videos", "missing_table"],
            "zero_row_queries": {
                "orphaned_videos": "SELECT v.id FROM videos v LEFT JOIN channels c "
                "ON c.id = v.channel_id WHERE c.id IS NULL"
            },
            "migrations": {"table": "alembic_version", "column": "version_num", "expected": "a1b2c3d4e5f6"},
        }
    )
    with pytest.raises(RunFailed) as e:
        restore(cfg, path, target_database="checked")
    text = str(e.value)
    assert "table missing_table: missing" in text and "query orphaned_videos: returned 1 rows" in text
    assert "migrations" not in text  # that one passed


class _Recorder(http.server.BaseHTTPRequestHandler):
    calls: list = []
    healthy = True

    def do_GET(self):
        self.calls.append(("GET", self.path))
        self.send_response(200 if self.healthy else 503)
        self.end_headers()

    def do_POST(self):
        self.calls.append(("POST", self.path))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def app_server():
    _Recorder.calls = []
    _Recorder.healthy = True
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()


def test_application_hooks_around_the_swap(pg, setup, app_server, tmp_path):
    url = f"http://127.0.0.1:{app_server.server_port}"
    marker = tmp_path / "hooks.log"
    path, cfg, _ = setup(
        application={
            "stop": [{"command": ["bash", "-c", f"echo stop >> {marker}"]}, {"url": f"{url}/stop", "method": "POST"}],
            "start": [{"command": ["bash", "-c", f"echo start >> {marker}"]}],
            "health_checks": [{"url": f"{url}/health"}, {"tcp": f"127.0.0.1:{pg.port}"}],
            "health_retries": 2,
            "health_interval": "0.1s",
        }
    )
    restore(cfg, path, clean=True, confirm="app")
    assert marker.read_text().split() == ["stop", "start"]
    assert _Recorder.calls == [("POST", "/stop"), ("GET", "/health")]
    _Recorder.healthy = False
    with pytest.raises(RunFailed, match=r"health check failed after 2 tries: GET .*/health answered 503"):
        restore(cfg, path, clean=True, confirm="app")


@pytest.mark.parametrize("spool", [True, False], ids=["spooled", "streamed"])
def test_failed_pg_restore_leaves_no_plaintext(pg, setup, spool):
    path, cfg, _ = setup(restore_spool=spool)
    pg.create_database("other_schema", sample_data=False)
    with pg.connect("other_schema") as conn:
        conn.execute("CREATE TABLE channels (id int)")  # data_only into a schema that does not fit
    with pytest.raises(RunFailed, match="pg_restore into 'other_schema' failed"):
        restore(cfg, path, target_database="other_schema", data_only=True, clean=True, confirm="other_schema")
    assert list(setup.scratch.iterdir()) == []


def test_restore_from_a_file(pg, setup, tmp_path):
    path, cfg, manifest = setup()
    obj = tmp_path / "b" / manifest.object_key(manifest.objects[0].name)
    r = run_cli("--config", str(path), "restore", "app", "--file", str(obj), "--into", "from_file")
    assert r.returncode == 0, r.stderr
    assert pg.table_checksums("from_file") == pg.table_checksums("app")


def test_restore_test_asset_after_backup(pg, setup):
    import dagster as dg

    from dr_pipelines.defs.build import build_definitions
    from dr_pipelines.defs.restore.restore_test import restore_test_job_name

    path, cfg, manifest = setup()
    defs = build_definitions(cfg, str(path))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(restore_test_job_name("app")).execute_in_process(instance=instance)
    assert result.success
    [mat] = result.asset_materializations_for_node("app__restore_test")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["passed"] is True and md["backup_id"] == manifest.id and md["rows"] == sum(manifest.tables.values())
    assert number(md["rto_s"]) > 0
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {"restore_test_passed": True, "restore_test_recent": True, "rto_within_objective": True}
    assert not any(d.startswith("dr_restore_test_") for d in databases(pg))  # scratch dropped
    [report] = load_reports(open_locations(cfg), "app", RecordKind.RESTORE_TEST)
    assert report.passed and report.backup_id == manifest.id


def test_restore_test_on_a_separate_test_server(make_pg, pg, setup):
    test_server = make_pg()
    path, cfg, manifest = setup(restore_test={"host": "127.0.0.1", "port": test_server.port, "keep": True})
    r = run_cli("--config", str(path), "test-restore", "app", "--no-cleanup")
    assert r.returncode == 0, r.stderr
    kept = [d for d in databases(test_server) if d.startswith("dr_restore_test_app_")]
    assert len(kept) == 1 and kept[0] in r.stdout
    assert test_server.table_checksums(kept[0]) == pg.table_checksums("app")
    assert not any(d.startswith("dr_restore_test_") for d in databases(pg))


FIDELITY_SQL = """
CREATE EXTENSION citext;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE SEQUENCE ticket_seq START 1000 INCREMENT 7;
CREATE TABLE people (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email citext UNIQUE NOT NULL,
    name text NOT NULL,
    feeling mood NOT NULL DEFAULT 'ok',
    age positive_int,
    tags text[] NOT NULL DEFAULT '{}',
    attrs jsonb,
    photo bytea,
    ticket integer NOT NULL DEFAULT nextval('ticket_seq'),
    name_upper text GENERATED ALWAYS AS (upper(name)) STORED,
    updated_at timestamptz
);
COMMENT ON TABLE people IS 'Menschen – personnes – 人々';
COMMENT ON COLUMN people.email IS 'case-insensitive';
CREATE TABLE events (id int, at date NOT NULL, payload jsonb) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX events_at_idx ON events (at);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := '2026-01-01 00:00:00+00'; RETURN NEW; END $$;
CREATE TRIGGER people_touch BEFORE INSERT OR UPDATE ON people FOR EACH ROW EXECUTE FUNCTION touch();
CREATE VIEW happy_people AS SELECT id, name FROM people WHERE feeling = 'happy';
CREATE MATERIALIZED VIEW people_by_mood AS SELECT feeling, count(*) AS n FROM people GROUP BY feeling;
INSERT INTO people (email, name, feeling, age, tags, attrs, photo)
SELECT 'User' || g || '@Example.com', 'Ñame ' || g || ' 日本 🎉', (ARRAY['sad','ok','happy'])[1 + g % 3]::mood, 1 + g % 90,
       ARRAY['t' || g, 'x'], jsonb_build_object('n', g, 'nested', jsonb_build_array(g, 'ü')), decode(md5(g::text), 'hex')
FROM generate_series(1, 500) g;
INSERT INTO events SELECT g, date '2025-06-01' + g, jsonb_build_object('g', g) FROM generate_series(1, 400) g;
REFRESH MATERIALIZED VIEW people_by_mood;
SELECT lo_from_bytea(424242, convert_to('a large object – ünïcödé', 'UTF8'));
SELECT lo_from_bytea(424243, decode(repeat('00ff', 5000), 'hex'));
"""


def _schema_dump(pg, dbname: str) -> str:
    out = subprocess.run(
        [
            "/usr/lib/postgresql/15/bin/pg_dump",
            "--schema-only",
            "-h",
            "127.0.0.1",
            "-p",
            str(pg.port),
            "-U",
            "postgres",
            dbname,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # pg_dump >= 15.14 writes a random \restrict key into every dump; everything else must match
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith(("\\restrict", "\\unrestrict")))


def _large_objects(pg, dbname: str) -> dict:
    with pg.connect(dbname) as conn:
        return dict(conn.execute("SELECT oid, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY 1").fetchall())


def test_fidelity_of_many_object_types(pg, write_config, age_key, tmp_path):
    pg.create_database("rich", sample_data=False)
    with pg.connect("rich") as conn:
        conn.execute(FIDELITY_SQL)
    path = write_config(
        pg,
        {"local": local_location(tmp_path / "b")},
        {"method": "age", "recipients": [age_key.recipient], "identity_file": str(age_key.identity_file)},
        dbname="rich",
    )
    cfg = config_from(path)
    manifest = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    assert manifest.tables["pg_catalog.pg_largeobject_metadata"] == 2
    report = restore(cfg, path, target_database="rich_restored")
    assert report.passed and report.validation["schema_matches"] is True
    assert _schema_dump(pg, "rich_restored") == _schema_dump(pg, "rich")
    assert pg.table_checksums("rich_restored") == pg.table_checksums("rich")
    assert _large_objects(pg, "rich_restored") == _large_objects(pg, "rich")
    probes = [
        "SELECT last_value, is_called FROM ticket_seq",  # sequences continue where they were
        "SELECT last_value FROM people_id_seq",
        "SELECT feeling, n FROM people_by_mood ORDER BY 1",  # materialized view data
        "SELECT count(*) FROM happy_people",
    ]
    with pg.connect("rich") as src, pg.connect("rich_restored") as dst:
        for q in probes:
            assert dst.execute(q).fetchall() == src.execute(q).fetchall(), q
        assert dst.execute("SELECT last_value FROM ticket_seq").fetchone()[0] == 1000 + 7 * 499


@pytest.mark.parametrize("tools", [True, False], ids=["age-and-zstd-processes", "in-process"])
def test_decoding_with_and_without_the_tools(tools, monkeypatch, tmp_path):
    """The same bytes come back whether age and zstd are installed or not; a wrong key and a
    corrupt stream are DecodeFailed, named by stage, either way."""
    import io

    import pyrage
    import zstandard

    from dr_pipelines.core.codec.decode import DecodeFailed, OutputFull, decode_into

    if not tools:
        monkeypatch.setenv("PATH", str(tmp_path))  # neither age nor zstd to be found
    key = pyrage.x25519.Identity.generate()
    plain = b"".join(b"row %d\t%s\n" % (i, bytes(str(i * 7919), "ascii") * 20) for i in range(200_000))
    compressed = zstandard.ZstdCompressor(level=3).compress(plain)
    stored = pyrage.encrypt(compressed, [key.to_public()])

    class Collect(io.RawIOBase):  # no fileno: the decoded bytes come back through write()
        def __init__(self):
            self.parts = []

        def write(self, b):
            self.parts.append(bytes(b))
            return len(b)

    out = Collect()
    decode_into(io.BytesIO(stored), out, "zstd", True, [key])
    assert b"".join(out.parts) == plain
    with open(tmp_path / "direct", "wb") as f:  # with a fileno
        decode_into(io.BytesIO(stored), f, "zstd", True, [key])
    assert (tmp_path / "direct").read_bytes() == plain
    with pytest.raises(DecodeFailed, match="cannot decrypt"):
        decode_into(io.BytesIO(stored), Collect(), "zstd", True, [pyrage.x25519.Identity.generate()])
    corrupt_zstd = pyrage.encrypt(compressed[: len(compressed) // 2] + b"\xff" * 64, [key.to_public()])
    with pytest.raises(DecodeFailed, match="cannot decompress"):
        decode_into(io.BytesIO(corrupt_zstd), Collect(), "zstd", True, [key])
    # a full disk is not the backup's fault: not DecodeFailed (which would fall back to an older backup)
    with open("/dev/full", "wb") as full, pytest.raises(OutputFull, match="(?i)no space left"):
        decode_into(io.BytesIO(stored), full, "zstd", True, [key])


def test_restore_test_checks_read_the_repository(pg, setup):
    """A restore test run outside Dagster (an empty instance) counts for the recency and RTO checks,
    as it does for `status`: both read the reports in the repository."""
    import dagster as dg

    from dr_pipelines.core.restore.restore_test import run_restore_test
    from dr_pipelines.defs.build import build_definitions

    path, cfg, _ = setup()
    defs = build_definitions(cfg, str(path))

    def evaluations():
        result = defs.resolve_job_def("dr_health_checks").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
        )
        return {
            e.asset_check_key.name: e
            for e in result.get_asset_check_evaluations()
            if e.asset_check_key.asset_key.path[-1] == "restore_test"
        }

    before = evaluations()
    recent = before["restore_test_recent"]
    assert not recent.passed and "no restore test has ever run" in (recent.description or "")
    report = run_restore_test(cfg, "app", open_locations(cfg))
    after = evaluations()
    assert after["restore_test_recent"].passed and after["rto_within_objective"].passed
    assert after["rto_within_objective"].metadata["rto_s"].value == report.rto_s


def test_spool_that_hits_a_full_disk_streams_instead(pg, setup, tmp_path, monkeypatch):
    """The disk fills while the dump is spooled (here zstd may write 64 KB: the loaders have read
    a cut file when it fails): the restore says so and streams instead, and the data is right; the
    backup is not blamed. (The loaders' lists of tables are in memory: no disk can refuse them.)"""
    from dr_pipelines.core.codec import decode
    from dr_pipelines.core.restore.load import restore_into
    from dr_pipelines.core.restore.request import RestoreRequest

    path, cfg, manifest = setup()
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    popen, spooled = decode.subprocess.Popen, []

    def zstd_with_little_room(cmd, **kw):
        if "zstd" in [Path(c).name for c in cmd] and not spooled:  # the first decode: the spool
            spooled.append(cmd)
            cmd = ["prlimit", "--fsize=65536", "--", *cmd]
        return popen(cmd, **kw)

    monkeypatch.setattr(decode.subprocess, "Popen", zstd_with_little_room)
    messages = []
    fetched, steps = restore_into(
        cfg,
        open_locations(cfg),
        RestoreRequest("app"),
        cfg.database("app"),
        "after_full_disk",
        workdir,
        True,
        messages.append,
    )
    assert fetched.manifest.id == manifest.id and not fetched.fallback_reasons
    assert any("file size limit exceeded" in m and "Streaming instead" in m for m in messages), messages
    assert "post_data" in steps and pg.table_checksums("after_full_disk") == pg.table_checksums("app")
    assert list(workdir.iterdir()) == []


def test_a_loader_killed_mid_load_fails_the_restore_and_leaves_nothing(pg, setup, tmp_path, monkeypatch):
    """One of the parallel pg_restore loaders dies (SIGKILL) while the dump decodes: the restore
    fails saying so, the other loader is stopped, the database made for it is dropped and no
    plaintext stays. The same restore then succeeds."""
    from dr_pipelines.core.restore import pg_restore
    from dr_pipelines.core.restore.load import restore_into
    from dr_pipelines.core.restore.request import RestoreError, RestoreRequest

    _, cfg, manifest = setup()
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    started = pg_restore.ParallelLoad._start
    loaders = []

    def start_then_kill_a_loader(self, args, **kw):
        proc = started(self, args, **kw)
        if "--section=data" in args:
            loaders.append(proc)
            if len(loaders) == 2:  # the second: its failure is seen while the first may still load
                proc.proc.kill()
        return proc

    def run():
        return restore_into(
            cfg, open_locations(cfg), RestoreRequest("app"), cfg.database("app"), "half_loaded", workdir, True, print
        )

    monkeypatch.setattr(pg_restore.ParallelLoad, "_start", start_then_kill_a_loader)
    with pytest.raises(RestoreError, match=r"pg_restore into 'half_loaded' failed \(exit -9\)"):
        run()
    assert len(loaders) == 2 and "half_loaded" not in databases(pg)
    assert all(p.proc.returncode is not None for p in loaders)  # none loads on alone
    assert list(workdir.iterdir()) == []
    monkeypatch.setattr(pg_restore.ParallelLoad, "_start", started)
    fetched, steps = run()
    assert fetched.manifest.id == manifest.id and steps["load"] > 0
    assert pg.table_checksums("half_loaded") == pg.table_checksums("app")
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("where", ["spool-on-server-disk", "spool-elsewhere", "streamed"])
def test_a_server_whose_disk_fills_while_loading_fails_the_restore_clearly_and_keeps_nothing(
    pg, make_pg, setup, tmp_path, monkeypatch, where
):
    """The server being restored into runs out of room while a table loads (its postmaster's
    file-size limit, which PostgreSQL reports as a failed write, stands for a full disk). When the
    spool is on the server's disk (here both are under /tmp) it may be what filled it: the restore
    says so and streams instead. When it is elsewhere (stood for by saying so), or when the restore
    already streams, streaming would load the same data into the same disk: the restore fails at
    once saying the server refused the write and what to do. Either way the database made for it is
    dropped and no plaintext stays; with room again, the same restore succeeds."""
    from dr_pipelines.core.postgres.cluster import run_as_postgres
    from dr_pipelines.core.restore import pg_restore
    from dr_pipelines.core.restore.load import restore_into
    from dr_pipelines.core.restore.request import RestoreError, RestoreRequest

    with pg.connect("app") as conn:  # a table larger than the server may write to one file
        conn.execute(
            "CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 8) AS body FROM generate_series(1, 40000) g"
        )
    _, cfg, manifest = setup(restore_spool=where != "streamed")
    assert manifest.table_bytes["public.big"] > 8 << 20
    target = make_pg()
    postmaster = (target.cluster.data_dir / "postmaster.pid").read_text().split()[0]

    def limit_files(size: str) -> None:  # the soft limit, inherited by every backend started from now on
        run_as_postgres(["prlimit", f"--pid={postmaster}", f"--fsize={size}:unlimited"], check=True)

    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    assert workdir.stat().st_dev == target.cluster.data_dir.stat().st_dev
    if where == "spool-elsewhere":
        monkeypatch.setattr(pg_restore.ParallelLoad, "_spool_on_server_disk", lambda self: False)
    server = cfg.database("app").model_copy(update={"port": target.port})
    messages: list[str] = []

    def run():
        return restore_into(
            cfg, open_locations(cfg), RestoreRequest("app"), server, "app_copy", workdir, True, messages.append
        )

    limit_files(str(4 << 20))
    with pytest.raises(RestoreError, match=r"database server refused a write for lack of room.*File too large") as e:
        run()
    assert "Free space on the server" in str(e.value)
    streamed_instead = [m for m in messages if "Streaming instead" in m]
    if where == "spool-on-server-disk":
        [said] = streamed_instead
        assert "File too large" in said and f"the spool in {workdir} is on the server's disk" in said
    else:
        assert streamed_instead == [], messages
    assert "app_copy" not in databases(target)
    assert list(workdir.iterdir()) == []
    limit_files("unlimited")
    run()
    assert target.table_checksums("app_copy") == pg.table_checksums("app")
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("failing", ["schema", "heaviest-loader"])
def test_a_step_that_fails_stops_the_restore_before_the_dump_is_read(pg, setup, tmp_path, monkeypatch, failing):
    """pg_restore's schema step fails (as on a new server lacking a role), or the loader of the
    heaviest share dies while the others wait for the decoder (cores shared with the server), while
    the dump is still being fetched: the restore fails at once with pg_restore's error, having read
    only part of the object, not at the end of a whole dump's decoding; nothing stays behind."""
    from dr_pipelines.core.codec import decode
    from dr_pipelines.core.restore import fetch, pg_restore
    from dr_pipelines.core.restore.load import restore_into
    from dr_pipelines.core.restore.request import RestoreError, RestoreRequest

    _, cfg, manifest = setup()
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    readers = []

    class SlowReader(fetch.HashingReader):  # a slow location: 4 KB a read, 50 ms each
        def __init__(self, raw):
            super().__init__(raw)
            readers.append(self)

        def read(self, size=-1):
            time.sleep(0.05)
            return super().read(size)

    started = pg_restore.ParallelLoad._start
    loaders = []

    def failing_step(self, args, **kw):
        if failing == "schema" and args == ["--section=pre-data"]:
            args = ["--section=pre-data", "--use-list=/nonexistent/schema.list"]
        proc = started(self, args, **kw)
        if args == ["--section=data"]:
            loaders.append(proc)
            if failing == "heaviest-loader" and len(loaders) == 1:  # the first holds the heaviest share
                proc.proc.kill()
        return proc

    monkeypatch.setattr(fetch, "HashingReader", SlowReader)
    monkeypatch.setattr(decode, "CHUNK", 4096)
    monkeypatch.setattr(pg_restore.ParallelLoad, "_start", failing_step)
    # the other loaders wait for the end of the decoding, as on a host with no more cores than loaders
    monkeypatch.setattr(pg_restore.ParallelLoad, "_cores_shared", lambda self: True)
    size = manifest.objects[0].size
    assert size > 40 * 4096  # whole, it would take over 2 s to read
    said = r"schema\.list" if failing == "schema" else r"\(exit -9\)"
    with pytest.raises(RestoreError, match=rf"pg_restore into 'new_db' failed.*{said}"):
        restore_into(
            cfg, open_locations(cfg), RestoreRequest("app"), cfg.database("app"), "new_db", workdir, True, print
        )
    [reader] = readers  # one copy, read once: the checksum is not read for, an age-encrypted read is authentic
    assert reader.size < size / 2
    assert "new_db" not in databases(pg) and list(workdir.iterdir()) == []
    if failing == "heaviest-loader":  # the other loader never started: it was waiting for the decoder
        assert len(loaders) == 1 and loaders[0].proc.returncode == -9


SHOP_SQL = """
CREATE TABLE big (id int PRIMARY KEY, body text);
INSERT INTO big SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g;
-- every row breaks this check: built before the rows load, it would refuse them
ALTER TABLE big ADD CONSTRAINT big_body_long CHECK (length(body) > 1000) NOT VALID;
-- named to come first in post-data: the entry before its comment, in the rest of post-data, is table data
CREATE TABLE customers (id int CONSTRAINT a_customers_pkey PRIMARY KEY, email text UNIQUE);
INSERT INTO customers SELECT g, g || '@example.org' FROM generate_series(1, 500) g;
CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, item int REFERENCES big);
INSERT INTO orders SELECT g, 1 + g % 500, 1 + g % 20000 FROM generate_series(1, 3000) g;
CREATE INDEX orders_customer ON orders (customer);
COMMENT ON CONSTRAINT a_customers_pkey ON customers IS 'built while big loads';
COMMENT ON INDEX orders_customer IS 'so is this one';
"""


def test_indexes_of_tables_loaded_first_are_built_while_the_largest_loads(
    pg, write_config, age_key, tmp_path, monkeypatch
):
    """The largest table is held back (locked) while it loads: the keys and indexes of the tables
    already loaded are built meanwhile; the foreign keys, and the largest table's own key and its
    NOT VALID check, wait for its rows. The restored database matches the source."""
    from dr_pipelines.core.restore import pg_restore
    from dr_pipelines.core.restore.load import restore_into
    from dr_pipelines.core.restore.request import RestoreRequest

    pg.create_database("shop", sample_data=False)
    with pg.connect("shop") as conn:
        conn.execute(SHOP_SQL)
    path = write_config(pg, {"local": local_location(tmp_path / "b")}, None, dbname="shop")
    cfg = config_from(path)
    run_logical_backup(cfg, "app", open_locations(cfg))
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    started = pg_restore.ParallelLoad._start
    lock: list = []
    built_early: list[str] = []

    def start_holding_the_largest_table(self, args, **kw):
        entries = "".join(f"{line}\n" for line in kw.get("use_list") or [])
        if "--section=data" in args and " TABLE DATA public big " in entries:
            lock.append(pg.connect("shop_restored"))
            lock[0].execute("BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE")
            lock.append(threading.Timer(20, lock[0].execute, ["COMMIT"]))  # nothing built early: fails below
            lock[1].start()
        proc = started(self, args, **kw)
        if "--section=post-data" in args and not built_early:
            built_early.append(entries)
            proc.proc.wait()
            lock[0].execute("COMMIT")  # the largest table loads now
        return proc

    monkeypatch.setattr(pg_restore.ParallelLoad, "_start", start_holding_the_largest_table)
    restore_into(
        cfg, open_locations(cfg), RestoreRequest("app"), cfg.database("app"), "shop_restored", workdir, True, print
    )
    lock[1].cancel()
    lock[0].close()
    [early] = built_early
    names = [line.split()[-2] for line in early.splitlines()]
    assert sorted(names) == [  # with their comments (which the schema dump below compares)
        "a_customers_pkey",
        "customers",
        "customers_email_key",
        "orders_customer",
        "orders_customer",
        "orders_pkey",
    ]
    assert _schema_dump(pg, "shop_restored") == _schema_dump(pg, "shop")
    assert pg.table_checksums("shop_restored") == pg.table_checksums("shop")
    assert list(workdir.iterdir()) == []


def test_restore_latest_onto_a_new_server_creates_the_database(make_pg, pg, setup, tmp_path):
    """The brand-new-server case: the configured database does not exist there yet, so `restore
    --latest` creates it with no confirmation (only a non-empty one needs --clean --yes)."""
    path, cfg, manifest = setup()
    before = pg.table_checksums("app")
    with pg.connect() as conn:  # the old server is gone: here, the database no longer exists
        conn.execute("DROP DATABASE app WITH (FORCE)")
    r = run_cli("--config", str(path), "restore", "app", "--latest")
    assert r.returncode == 0, r.stderr
    assert pg.table_checksums("app") == before
    r = run_cli("--config", str(path), "restore", "app", "--latest")  # now it holds data: confirmation needed
    assert r.returncode != 0 and "is the source database 'app' itself" in r.stderr


def test_plain_sql_dumps_of_the_runbooks_are_imported(pg, setup, tmp_path):
    """SongNodes' `pg_dump DB | gzip > X.sql.gz` files restore through psql in one transaction, with the
    same staging and swap; a truncated one or one that fails halfway leaves nothing."""
    import gzip

    path, cfg, _ = setup()
    plain = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "app"],
        capture_output=True,
        check=True,
    ).stdout
    gz = tmp_path / "musicdb_20261206_020000.sql.gz"
    gz.write_bytes(gzip.compress(plain))
    r = run_cli("--config", str(path), "restore", "app", "--file", str(gz), "--into", "from_sql_gz")
    assert r.returncode == 0, r.stderr
    assert pg.table_checksums("from_sql_gz") == pg.table_checksums("app")
    sql = tmp_path / "dump.sql"
    sql.write_bytes(plain)
    r = run_cli("--config", str(path), "restore", "app", "--file", str(sql), "--into", "from_sql")
    assert r.returncode == 0, r.stderr
    assert pg.table_checksums("from_sql") == pg.table_checksums("app")
    truncated = tmp_path / "cut.sql.gz"
    truncated.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    r = run_cli("--config", str(path), "restore", "app", "--file", str(truncated), "--into", "from_cut")
    assert r.returncode != 0 and "damaged or truncated" in r.stderr and "nothing of it was loaded" in r.stderr
    failing = tmp_path / "failing.sql"
    failing.write_bytes(plain + b"\nSELECT no_such_function();\n")
    r = run_cli("--config", str(path), "restore", "app", "--file", str(failing), "--into", "from_failing")
    assert r.returncode != 0 and "no_such_function" in r.stderr and "one transaction" in r.stderr
    assert not {"from_cut", "from_failing"} & databases(pg)
    assert not [d for d in databases(pg) if "__restoring_" in d]  # no staging database stays


def test_a_labelled_backup_is_listed_with_its_label_and_restored_by_it(pg, setup, tmp_path):
    path, cfg, _ = setup()
    labelled = run_cli("--config", str(path), "backup", "app", "--label", "pre-migration")
    assert labelled.returncode == 0, labelled.stderr
    backup_id = labelled.stdout.strip().splitlines()[-1]
    with pg.connect("app") as conn:  # the migration
        conn.execute("ALTER TABLE fingerprints ADD COLUMN migrated int DEFAULT 1")
    assert run_cli("--config", str(path), "backup", "app").returncode == 0  # a newer, unlabelled backup
    listed = run_cli("--config", str(path), "backups", "list", "app")
    [line] = [ln for ln in listed.stdout.splitlines() if backup_id in ln]
    assert line.rstrip().endswith("pre-migration")
    r = run_cli("--config", str(path), "restore", "app", "--backup", "pre-migration", "--into", "before_migration")
    assert r.returncode == 0, r.stderr
    with pg.connect("before_migration") as conn:
        columns = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'fingerprints'"
            )
        ]
    assert "migrated" not in columns


def test_the_restore_run_ends_with_a_readable_summary_and_nearest_ids_in_time_order(pg, setup):
    path, cfg, manifest = setup()
    run_config = {"ops": {"choose_backup": {"config": {"database": "app", "target_database": "summary_db"}}}}
    from dr_pipelines.defs.restore.definitions import build_restore_definitions

    result = runner.run_job(cfg, str(path), "restore_database", run_config, domain=build_restore_definitions)
    [out] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == "restore_report"]
    summary = str(out.event_specific_data.metadata["summary"].value)  # type: ignore[union-attr]
    assert "restore of `app` into `summary_db`: PASSED" in summary
    assert f"`{manifest.id}`" in summary and "| RTO |" in summary and "validation passed" in summary
    newer = run_logical_backup(cfg, "app", open_locations(cfg)).manifest
    with pytest.raises(RunFailed, match="nearest: ") as refused:
        restore(cfg, path, backup="2026", target_database="x")
    listed = str(refused.value).split("nearest: ")[1].split(";")[0].split(" (")[0].split(", ")
    assert listed == sorted(listed, reverse=True) and newer.id in listed  # newest first
