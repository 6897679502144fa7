"""The WAL archive: PostgreSQL's own archiver runs `dr-pipelines wal-push`; `wal-fetch` returns the
same bytes; the failure paths PostgreSQL depends on (exit codes, refusals) hold."""

import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
import yaml

from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines.core.wal.archive import list_archive
from dr_pipelines_tests.support.configs import BUCKET, config_from, s3_location
from dr_pipelines_tests.support.processes import run_cli
from dr_pipelines_tests.support.servers import start_moto
from dr_pipelines_tests.support.wal import WalSetup


@pytest.fixture
def wal_setup(pg):
    setup = WalSetup(pg)
    yield setup
    setup.cleanup()


def test_postgres_archives_through_wal_push_and_fetch_returns_the_bytes(wal_setup, tmp_path):
    wal_setup.enable_archiving()
    names = [wal_setup.switch_and_wait() for _ in range(3)]
    archive = list_archive(open_locations(wal_setup.config), "app")
    assert set(names) <= set(archive.segments[1]) and archive.gaps(1) == []
    listed = wal_setup.cli("wal", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [tl] = json.loads(listed.stdout)["timelines"]
    assert tl["timeline"] == 1 and tl["gaps"] == [] and tl["last"] >= names[-1]
    # stored compressed and encrypted, not in the clear
    stored = next((wal_setup.repo / "app/wal/00000001").glob(f"{names[0]}.zst.age"))
    original = (wal_setup.server.cluster.data_dir / "pg_wal" / names[0]).read_bytes()
    assert original[:64] not in stored.read_bytes()

    dest = tmp_path / "RECOVERYXLOG"
    r = wal_setup.cli("wal-fetch", names[0], str(dest))
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == original
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temp file left
    # the following segments were fetched ahead (verified); the next request is a rename
    spool = tmp_path / ".dr_pipelines_prefetch"
    assert {names[1], names[2]} <= {p.name for p in spool.iterdir()}
    r = wal_setup.cli("wal-fetch", names[1], str(tmp_path / "NEXT"))
    assert r.returncode == 0 and not (spool / names[1]).exists()
    assert (tmp_path / "NEXT").read_bytes() == (wal_setup.server.cluster.data_dir / "pg_wal" / names[1]).read_bytes()

    # PostgreSQL asks for files that never existed: exit 1, "not found", nothing written
    missing = wal_setup.cli("wal-fetch", "00000002.history", str(tmp_path / "h"))
    assert missing.returncode == 1 and "not in the WAL archive" in missing.stderr
    assert not (tmp_path / "h").exists()


def test_push_refuses_different_content_and_another_cluster(wal_setup, tmp_path):
    wal_setup.enable_archiving()
    name = wal_setup.switch_and_wait()
    segment = wal_setup.server.cluster.data_dir / "pg_wal" / name
    copy = tmp_path / name
    shutil.copy(segment, copy)
    again = wal_setup.cli("wal-push", str(copy))  # PostgreSQL re-archiving after a crash: same bytes
    assert again.returncode == 0, again.stderr

    data = bytearray(copy.read_bytes())
    data[5000] ^= 0xFF
    copy.write_bytes(bytes(data))
    differs = wal_setup.cli("wal-push", str(copy))
    assert differs.returncode == 1 and "already archived on local with different content" in differs.stderr

    # a segment from another cluster (the test clusters share one initdb, so give this copy
    # another system identifier in its long page header, as a different initdb would have)
    foreign = bytearray(segment.read_bytes())
    foreign[24:32] = (int.from_bytes(foreign[24:32], "little") + 1).to_bytes(8, "little")
    foreign_copy = tmp_path / "foreign" / "0000000100000000000000F0"
    foreign_copy.parent.mkdir()
    foreign_copy.write_bytes(bytes(foreign))
    refused = wal_setup.cli("wal-push", str(foreign_copy))
    assert refused.returncode == 1 and "comes from cluster" in refused.stderr and "refusing to mix" in refused.stderr
    assert not list(wal_setup.repo.rglob("0000000100000000000000F0*"))

    junk = tmp_path / "notwal"
    junk.write_bytes(b"x" * 100)
    assert wal_setup.cli("wal-push", str(junk)).returncode == 1


def test_location_down_during_push_then_back(pg, tmp_path):
    """A location down: non-zero exit (PostgreSQL retries), nothing lost once it is back."""
    doomed = start_moto()
    s3 = boto3.client("s3", endpoint_url=doomed.url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    setup = WalSetup(pg, {"s3": s3_location(doomed)})
    try:
        setup.enable_archiving()
        name = setup.switch_and_wait()
        segment = tmp_path / name
        shutil.copy(pg.cluster.data_dir / "pg_wal" / name, segment)
        port = doomed.port
        doomed.stop()
        with pg.connect() as conn:
            conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
            pending = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + 30
            while conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0] == 0:
                assert time.monotonic() < deadline, "the archiver never reported a failure"
                time.sleep(0.2)
            stats = conn.execute("SELECT * FROM pg_stat_archiver").fetchone()
            assert stats[0] > 0 and stats[1] < pending, f"{stats} {pending} {pg.cluster.log_file.read_text()[-3000:]}"
        ready = pg.cluster.data_dir / "pg_wal" / "archive_status" / f"{pending}.ready"
        assert ready.exists()  # PostgreSQL keeps it and will retry

        # the S3 server comes back (same port, empty: a new bucket); the archiver catches up
        import subprocess
        import sys

        from dr_pipelines_tests.support.processes import wait_for_port
        from dr_pipelines_tests.support.servers import HttpServer

        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        back = HttpServer(proc, port)
        try:
            wait_for_port(port)
            boto3.client("s3", endpoint_url=back.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            with pg.connect() as conn:
                deadline = time.monotonic() + 60
                while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < pending:
                    assert time.monotonic() < deadline, "the archiver did not catch up"
                    time.sleep(0.2)
            s3_keys = [
                o["Key"]
                for o in boto3.client("s3", endpoint_url=back.url, region_name="us-east-1")
                .list_objects_v2(Bucket=BUCKET)
                .get("Contents", [])
            ]
            assert any(k.endswith(f"{pending}.json") for k in s3_keys)
            # a segment archived while S3 was down is fetched from S3 alone, byte for byte
            s3_only = open_locations(setup.config, "s3")
            from dr_pipelines.core.codec.keys import load_identities
            from dr_pipelines.core.wal.fetch import wal_fetch

            wal_fetch(setup.config, "app", pending, tmp_path / "fetched", s3_only, load_identities(setup.config))
            assert (tmp_path / "fetched").read_bytes() == (pg.cluster.data_dir / "pg_wal" / pending).read_bytes()
        finally:
            back.stop()
    finally:
        setup.cleanup()


def test_fetch_corrupt_copy_and_unreachable_location(wal_setup, tmp_path):
    wal_setup.enable_archiving()
    name = wal_setup.switch_and_wait()
    obj = next((wal_setup.repo / "app/wal/00000001").glob(f"{name}.zst.age"))
    good = obj.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    obj.write_bytes(bytes(bad))
    r = wal_setup.cli("wal-fetch", name, str(tmp_path / "x"))
    # corrupt is not "not found": recovery must abort (exit > 125), never end early
    assert r.returncode > 125 and "fails its checksum" in r.stderr
    assert not (tmp_path / "x").exists()

    # the location unreachable (its directory unreadable): also an abort, after the retries
    obj.write_bytes(good)
    os.rename(wal_setup.repo, wal_setup.root / "moved")
    (wal_setup.repo).write_text("not a directory")
    r = wal_setup.cli("wal-fetch", name, str(tmp_path / "y"))
    assert r.returncode > 125, r.stderr
    assert "attempt 2 failed" in r.stderr


def test_conflict_on_one_location_writes_nothing_anywhere(wal_setup, tmp_path):
    """A segment already archived with other bytes on one location: refused before the new bytes
    reach any other location (never two different copies of one segment)."""
    from dr_pipelines.core.wal.push import wal_push

    second = tmp_path / "second"
    cfg = wal_setup.config.model_copy(
        update={
            "locations": {
                "second": wal_setup.config.locations["local"].model_copy(update={"path": str(second)}),
                "local": wal_setup.config.locations["local"],
            }
        }
    )
    wal_setup.enable_archiving()
    name = wal_setup.switch_and_wait()  # archived on `local` only
    copy = tmp_path / name
    data = bytearray((wal_setup.server.cluster.data_dir / "pg_wal" / name).read_bytes())
    data[9000] ^= 0xFF
    copy.write_bytes(bytes(data))
    from dr_pipelines.core.wal.archive import WalRefused

    with pytest.raises(WalRefused, match="different content"):
        wal_push(cfg, "app", copy, open_locations(cfg))
    assert not list(second.rglob(f"{name}*"))  # `second` comes first and still got nothing


def test_archive_listing_reads_no_objects_and_agrees_on_every_location(wal_setup, three_locations, tmp_path):
    """`list_archive` works from each location's listing alone (push times included); a sidecar
    whose object is gone counts as missing there, and says so."""
    from dr_pipelines.core.wal.push import wal_push

    wal_setup.enable_archiving()
    names = [wal_setup.switch_and_wait() for _ in range(3)]
    raw = yaml.safe_load(wal_setup.config_path.read_text())
    raw["locations"] = three_locations
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from(tmp_path / "three.yaml")
    locs = open_locations(cfg)
    before = datetime.now(timezone.utc)
    for name in names:
        wal_push(cfg, "app", wal_setup.server.cluster.data_dir / "pg_wal" / name, locs)
    for loc_name in locs:
        archive = list_archive({loc_name: locs[loc_name]}, "app")
        assert archive.segments == {1: names} and archive.problems == [], loc_name
        assert archive.segment_size == 1 << 20  # the test clusters use 1 MB segments
        newest = archive.newest()
        assert newest.name == names[-1] and newest.object_name == f"{names[-1]}.zst.age"
        assert before - timedelta(seconds=5) <= newest.pushed_at <= datetime.now(timezone.utc) + timedelta(seconds=5)
    # the middle segment's object is lost on S3, its sidecar is not
    locs["s3"].delete(f"app/wal/00000001/{names[1]}.zst.age")
    on_s3 = list_archive({"s3": locs["s3"]}, "app")
    assert on_s3.gaps(1) == [(names[1], names[1])]
    assert "sidecar without its object" in on_s3.problems[0] and names[1] in on_s3.problems[0]
    assert list_archive(locs, "app").gaps(1) == []  # the other locations still hold it
    # cluster.json lost: the segment size comes from a sidecar, so gaps are still computed
    locs["s3"].delete("app/wal/cluster.json")
    on_s3 = list_archive({"s3": locs["s3"]}, "app")
    assert on_s3.segment_size == 1 << 20 and on_s3.gaps(1) == [(names[1], names[1])]


def test_push_ahead_archives_ready_segments_and_their_calls_return_at_once(wal_setup, tmp_path):
    """wal-push also archives the later segments PostgreSQL marked ready; the calls for them take
    the fast path, unless their marker does not match the file."""
    wal_setup.enable_archiving()
    names = [wal_setup.switch_and_wait() for _ in range(4)]
    pg_wal = tmp_path / "pg_wal"  # a copy, archived into a fresh repository
    (pg_wal / "archive_status").mkdir(parents=True)
    for name in names:
        shutil.copy(wal_setup.server.cluster.data_dir / "pg_wal" / name, pg_wal / name)
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    raw = yaml.safe_load(wal_setup.config_path.read_text())
    raw["locations"] = {"local": {"type": "local", "path": str(tmp_path / "repo")}}
    raw["wal"]["push_ahead"] = 2
    config_path = tmp_path / "dr.yaml"
    config_path.write_text(yaml.safe_dump(raw))

    def push(name):
        return run_cli("--config", str(config_path), "wal-push", str(pg_wal / name))

    r = push(names[0])
    assert r.returncode == 0, r.stderr
    assert f"archived ahead: {names[1]}, {names[2]}" in r.stderr  # no more than push_ahead
    locs = open_locations(config_from(config_path))
    assert list_archive(locs, "app").segments == {1: names[:3]}
    markers = pg_wal / ".dr_pipelines_pushed"
    assert sorted(p.name for p in markers.iterdir()) == [names[1], names[2]]
    (pg_wal / "archive_status" / f"{names[0]}.ready").rename(pg_wal / "archive_status" / f"{names[0]}.done")

    r = push(names[1])  # the fast path: nothing loaded, nothing said
    assert r.returncode == 0 and r.stderr == "" and not (markers / names[1]).exists()
    (pg_wal / "archive_status" / f"{names[1]}.ready").rename(pg_wal / "archive_status" / f"{names[1]}.done")

    (markers / names[2]).write_text("16777216 00")  # a marker that does not match the file
    r = push(names[2])
    assert r.returncode == 0, r.stderr
    # the normal way (only it archives ahead); the stale marker is gone
    assert f"archived ahead: {names[3]}" in r.stderr and not (markers / names[2]).exists()
    assert list_archive(locs, "app").segments == {1: names}
    (pg_wal / "archive_status" / f"{names[2]}.ready").rename(pg_wal / "archive_status" / f"{names[2]}.done")

    # the config changed after names[3] was archived ahead (a location added): its marker no longer counts
    raw["locations"]["second"] = {"type": "local", "path": str(tmp_path / "repo2")}
    config_path.write_text(yaml.safe_dump(raw))
    r = push(names[3])
    assert r.returncode == 0 and not (markers / names[3]).exists()
    assert list_archive(open_locations(config_from(config_path), "second"), "app").segments == {1: [names[3]]}


def test_a_hole_postgres_has_not_archived_yet_is_not_a_gap(wal_setup, tmp_path):
    """wal-push archives ahead in parallel, so N+2 can land before N+1: until PostgreSQL reports
    N+1 archived, the hole is work in flight, not a gap; an old hole is a gap."""
    from dr_pipelines.core.postgres.wal_names import parse_segment, segment_name
    from dr_pipelines.core.wal.archive import wal_status
    from dr_pipelines.core.wal.push import wal_push

    wal_setup.enable_archiving()
    names = [wal_setup.switch_and_wait() for _ in range(3)]
    locs = open_locations(wal_setup.config)
    size = list_archive(locs, "app").segment_size
    assert size is not None
    tli, last = parse_segment(names[-1], size)
    ahead = tmp_path / segment_name(tli, last + 2, size)  # as if pushed ahead of last + 1
    shutil.copy(wal_setup.server.cluster.data_dir / "pg_wal" / names[-1], ahead)
    wal_push(wal_setup.config, "app", ahead, locs)
    now = datetime.now(timezone.utc)
    assert wal_status(wal_setup.config, "app", locs, now, []).gaps == []
    # an old hole (PostgreSQL archived it, the copy is gone) is a gap
    victim = next((wal_setup.repo / "app" / "wal" / "00000001").glob(f"{names[1]}.*.age"))
    victim.unlink()
    assert wal_status(wal_setup.config, "app", locs, now, []).gaps == [names[1]]


def test_a_ready_file_that_cannot_be_archived_ahead_does_not_fail_the_call(wal_setup, tmp_path):
    """Archiving ahead is best effort: a later ready file that is refused (not WAL) is reported and
    left for PostgreSQL's own call; the segment asked for is archived and the call succeeds."""
    wal_setup.enable_archiving()
    name = wal_setup.switch_and_wait()
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    shutil.copy(wal_setup.server.cluster.data_dir / "pg_wal" / name, pg_wal / name)
    garbage = f"{name[:16]}{int(name[16:], 16) + 1:08X}"
    (pg_wal / garbage).write_bytes(b"\0" * 4096)  # no long page header: refused by wal-push
    for n in (name, garbage):
        (pg_wal / "archive_status" / f"{n}.ready").touch()
    raw = yaml.safe_load(wal_setup.config_path.read_text())
    raw["locations"] = {"local": {"type": "local", "path": str(tmp_path / "repo")}}
    config_path = tmp_path / "dr.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    r = run_cli("--config", str(config_path), "wal-push", str(pg_wal / name))
    assert r.returncode == 0, r.stderr
    assert f"{garbage}: not archived ahead" in r.stderr and "long page header" in r.stderr
    assert list_archive(open_locations(config_from(config_path)), "app").segments == {1: [name]}
    assert not (pg_wal / ".dr_pipelines_pushed" / garbage).exists()


def test_pushes_in_one_process_reuse_buffers_without_mixing_files(wal_setup, tmp_path):
    """wal_push reads into buffers it keeps from push to push (a resident agent's): a short file
    after a segment, and segments after it, come back byte for byte; a file that cannot be read
    is a WalError that says so, and the next push is unaffected."""
    from dr_pipelines.core.codec.keys import load_identities
    from dr_pipelines.core.wal.archive import WalError
    from dr_pipelines.core.wal.fetch import wal_fetch
    from dr_pipelines.core.wal.push import wal_push

    wal_setup.enable_archiving()
    names = [wal_setup.switch_and_wait() for _ in range(2)]
    pg_wal = wal_setup.server.cluster.data_dir / "pg_wal"
    cfg = wal_setup.config.model_copy(
        update={
            "locations": {"local": wal_setup.config.locations["local"].model_copy(update={"path": str(tmp_path / "r")})}
        }
    )
    locs = open_locations(cfg)
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    wal_push(cfg, "app", pg_wal / names[0], locs)
    wal_push(cfg, "app", history, locs)  # shorter than the buffer it is read into
    with pytest.raises(WalError, match="cannot read"):
        wal_push(cfg, "app", tmp_path / names[1], locs)  # no such file
    wal_push(cfg, "app", pg_wal / names[1], locs)
    for source in (pg_wal / names[0], history, pg_wal / names[1]):
        back = tmp_path / f"back-{source.name}"
        wal_fetch(cfg, "app", source.name, back, locs, load_identities(cfg), prefetch=0)
        assert back.read_bytes() == source.read_bytes(), source.name
