"""Streamed WAL (issue 14, part 2): `dr-pipelines wal-stream DB` runs pg_receivewal on a replication
slot and pushes what it receives (complete segments through the archive_command's own code, the
growing partial segment every partial_interval), so a lost server loses seconds, not a segment.

Real clusters (1 MB segments), the real command run as the postgres user (as systemd would), the
real S3 server behind a proxy that can be switched off. What was committed is compared with what a
recovery from the repository alone holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from dr_pipelines.core.backup.base import run_base_backup
from dr_pipelines.core.codec.keys import load_identities
from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres
from dr_pipelines.core.postgres.wal_names import STREAM_SUFFIX, lsn_int, segment_name
from dr_pipelines.core.storage.base import forget_down
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines.core.wal.archive import _read_json, list_archive, wal_status
from dr_pipelines.core.wal.fetch import wal_fetch
from dr_pipelines.core.wal.stream import state_dir
from dr_pipelines_tests.support.configs import config_from, gcs_location, s3_location
from dr_pipelines_tests.support.metadata import number
from dr_pipelines_tests.support.processes import VENV_BIN, wait_for
from dr_pipelines_tests.support.servers import FaultyProxy
from dr_pipelines_tests.support.wal import WalSetup

# --------------------------------------------------------------------------- helpers


class Streamer:
    """`dr-pipelines wal-stream app` in the foreground, as the postgres user (as a systemd unit would)."""

    def __init__(self, setup: WalSetup, state: Path):
        self.setup, self.state = setup, state
        self.log_path = state.parent / f"{state.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Streamer:
        log = open(self.log_path, "ab")  # noqa: SIM115 -- the child holds it; closed with the test's files
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "dr-pipelines"), "wal-stream", "app", "--config", str(self.setup.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            user="postgres",
            group="postgres",
            extra_groups=[],
            cwd="/",
            start_new_session=True,
        )
        log.close()
        return self

    def status(self) -> dict:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_streaming(self, timeout: float = 30, not_receiver: int | None = None) -> dict:
        def ready():
            st = self.status()
            receiver = st.get("receiver", {})
            alive = receiver.get("alive") and st.get("pid") == (self.proc.pid if self.proc else None)
            return st if alive and receiver.get("pid") != not_receiver else None

        found = wait_for(ready, f"wal-stream streaming (log: {self.log()[-2000:]})", timeout)
        assert isinstance(found, dict)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(
                f"wal-stream did not stop on SIGTERM within {timeout}s: {self.log()[-2000:]}"
            ) from None
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def set_config(setup: WalSetup, top: dict | None = None, **database) -> None:
    raw = yaml.safe_load(setup.config_path.read_text())
    for key, value in database.items():
        raw["databases"]["app"][key] = value
    raw.update(top or {})
    setup.config_path.write_text(yaml.safe_dump(raw))
    setup.config = config_from(setup.config_path)


def newest_partial(setup: WalSetup, only: str | None = None) -> dict | None:
    """The sidecar of the newest streamed partial in the archive (None if there is none)."""
    archive = list_archive(open_locations(setup.config, only), "app")
    names = sorted(n for n, f in archive.files.items() if f.kind == "streamed")
    if not names:
        return None
    locs = open_locations(setup.config, only)
    return next(
        (s for loc in locs.values() if (s := _read_json(loc, f"app/wal/{names[-1][:8]}/{names[-1]}.json"))), None
    )


def flush_lsn(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]


def kill_cluster(cluster: LocalCluster) -> None:
    """kill -9 the postmaster and every child of it at once: the server is lost, nothing is flushed."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == postmaster:
                pids.append(int(entry))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not Path(f"/proc/{postmaster}").exists() or _zombie(postmaster), "the postmaster dies", 10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def slot_row(conn: psycopg.Connection, slot: str = "dr_pipelines_app") -> tuple | None:
    return conn.execute(
        "SELECT active, restart_lsn::text, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()


def pitr_latest(setup: WalSetup, restored: Callable[[], Path], only: str | None = None) -> dict:
    """`dr-pipelines pitr app --latest` into a new directory: the recovery an operator runs."""
    r = setup.cli("pitr", "app", "--latest", "--data-dir", str(restored()), *(["--location", only] if only else []))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def connect(port: int) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="app", autocommit=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def streams() -> Iterator[list[Streamer]]:
    started: list[Streamer] = []
    yield started
    for s in started:
        s.kill()


@pytest.fixture
def make_stream(pg, streams) -> Iterator[Callable[..., tuple[WalSetup, Streamer]]]:
    """A cluster archiving through archive_command (unless told not to), with streaming configured."""
    setups: list[WalSetup] = []

    def make(
        archive_command: bool = True, extra_locations: dict | None = None, **streaming
    ) -> tuple[WalSetup, Streamer]:
        setup = WalSetup(pg, extra_locations)
        setups.append(setup)
        state = setup.root / "stream"
        state.mkdir()
        chown_to_postgres(state)
        set_config(
            setup,
            streaming={"enabled": True, "partial_interval": "0.5s", "spool_dir": str(state), **streaming},
        )
        # a commit returns once its WAL is flushed (the template's clusters do not wait): what
        # "committed" means to an application
        pg.cluster.write_settings({"synchronous_commit": "on", "wal_keep_size": "0"})
        if archive_command:
            setup.enable_archiving()
        else:
            pg.cluster.stop("fast")
            pg.cluster.start()
        stream = Streamer(setup, state)
        streams.append(stream)
        return setup, stream

    yield make
    for s in setups:
        s.cleanup()


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("only", [None, "gcs"])
def test_streamed_partial_makes_a_lost_server_lose_nothing(make_stream, restored_dirs, request, only):
    """Rows committed seconds before the server is lost (no segment switch, no archive_timeout) are
    in the archive's partial segment within a couple of seconds; with the server killed and its data
    directory deleted, `pitr --latest` from the repository alone recovers every committed row. Also
    streamed to GCS (the emulator) and recovered from GCS alone."""
    extra = None
    if only == "gcs":
        request.getfixturevalue("gcs")
        extra = {"gcs": gcs_location()}
    setup, stream = make_stream(extra_locations=extra)
    pg = setup.server
    base = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest
    stream.start().wait_streaming()

    committed: list[int] = []
    with connect(pg.port) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text NOT NULL)")
        for i in range(1, 301):  # one transaction each, as an application commits
            conn.execute("INSERT INTO orders VALUES (%s, md5(%s::text))", (i, i))
            committed.append(i)
        end_lsn = flush_lsn(conn)
        returned = time.monotonic()
        segment = conn.execute("SELECT pg_walfile_name(%s::pg_lsn)", (end_lsn,)).fetchone()[0]

    def durable():
        side = newest_partial(setup, only)
        return side if side and lsn_int(side["end_lsn"]) >= lsn_int(end_lsn) else None

    side = wait_for(durable, f"the streamed partial reaches {end_lsn}", timeout=10, every=0.05)
    took = time.monotonic() - returned
    assert isinstance(side, dict) and side["segment"] == segment and took < 3.0, took
    archive = list_archive(open_locations(setup.config, only), "app")
    assert segment not in archive.segments.get(1, []), "the segment was switched: the test proves nothing"
    assert archive.files[segment + STREAM_SUFFIX].kind == "streamed"
    listed = setup.cli("wal", "list", "--json")
    assert json.loads(listed.stdout)["streamed_partials"][-1] == segment + STREAM_SUFFIX, listed.stderr

    kill_cluster(pg.cluster)
    shutil.rmtree(pg.cluster.data_dir)
    time.sleep(1.0)  # the streamer notices its server is gone; nothing more can come
    assert stream.stop() == 0, stream.log()[-3000:]

    report = pitr_latest(setup, restored_dirs, only)
    assert report["backup_id"] == base.id and report["promoted"]
    with connect(report["port"]) as conn:
        present = [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]
    assert present == committed
    fetched = [w for w in report["warnings"] if "ended before the end of the archive" in w]
    assert not fetched, report["warnings"]


def _switch(conn: psycopg.Connection, rows: int = 2000) -> str:
    """Some WAL, then a segment switch; the segment it completed."""
    conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,))
    return conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]


def test_pg_receivewal_killed_is_restarted_and_the_archive_has_no_gap(make_stream, tmp_path):
    """SIGKILL to pg_receivewal while WAL is written and checkpoints run: the slot keeps that WAL in
    pg_wal, wal-stream restarts pg_receivewal (saying why), and the archive, written by the
    streamer alone (no archive_command), holds every segment from its first to its last, each
    byte-identical to the server's."""
    setup, stream = make_stream(archive_command=False)
    pg = setup.server
    status = stream.start().wait_streaming()
    with connect(pg.port) as conn:
        conn.execute("CREATE TABLE t (g int, h text)")
        before = [_switch(conn) for _ in range(2)]
        wait_for(lambda: (stream.status()["received"]["segment"] or "") >= before[-1], "streamed before the kill")

        def slot_segment() -> str:
            return conn.execute(
                "SELECT pg_walfile_name(restart_lsn) FROM pg_replication_slots WHERE slot_name = 'dr_pipelines_app'"
            ).fetchone()[0]

        # the slot is the streamer's: it follows what pg_receivewal confirms (a slot nobody reads keeps all)
        wait_for(lambda: slot_segment() > before[0], "the slot advances with the streamer")

        victim = status["receiver"]["pid"]
        os.kill(victim, signal.SIGKILL)
        # while it is dead: WAL, and checkpoints that would recycle it were it not for the slot
        during = [_switch(conn) for _ in range(3)]
        conn.execute("CHECKPOINT")
        conn.execute("CHECKPOINT")
        done_at = datetime.now(timezone.utc)
        row = slot_row(conn)
        assert row is not None
        _, restart_lsn, slot_status, _ = row
        held = segment_name(1, lsn_int(restart_lsn) // (1 << 20), 1 << 20)  # the first segment the slot keeps
        assert held <= during[0] and slot_status in ("reserved", "extended")
        pg_wal = pg.cluster.data_dir / "pg_wal"
        assert all((pg_wal / n).exists() for n in during)  # kept for the slot

        restarted = stream.wait_streaming(not_receiver=victim)
        assert restarted["receiver"]["restarts"] >= 1
        assert datetime.fromisoformat(restarted["receiver"]["started_at"]) > done_at, (
            "pg_receivewal was back before the WAL was written: the test did not exercise the dead window"
        )
        after = [_switch(conn) for _ in range(2)]
    wait_for(lambda: (stream.status()["received"]["segment"] or "") >= after[-1], "streamed after the restart")
    assert "killed by signal 9" in stream.log()

    # wal-stream itself killed: its pg_receivewal goes with it (no orphan holds the slot), and the
    # next wal-stream (systemd's restart) carries on where the spool and the slot are
    assert stream.proc is not None
    receiver = stream.status()["receiver"]["pid"]
    os.kill(stream.proc.pid, signal.SIGKILL)
    stream.proc.wait()
    wait_for(lambda: _zombie(receiver), "pg_receivewal exits with its wal-stream", 10)
    stream.start().wait_streaming()
    with connect(pg.port) as conn:
        after.append(_switch(conn))
    wait_for(lambda: (stream.status()["received"]["segment"] or "") >= after[-1], "streamed after wal-stream's restart")
    assert stream.stop() == 0

    locs = open_locations(setup.config)
    archive = list_archive(locs, "app")
    names = archive.segments[1]
    assert archive.gaps(1) == [] and archive.problems == []
    assert set(before + during + after) <= set(names)
    first, last = names[0], names[-1]
    assert last >= after[-1] and names == sorted(names)
    ids = load_identities(setup.config)
    compared = 0
    for name in names:
        if not (pg_wal / name).exists():  # recycled after the streamer had it (older than the slot)
            assert name < held, f"{name} is gone from pg_wal though the slot should hold it"
            continue
        dest = tmp_path / name
        wal_fetch(setup.config, "app", name, dest, locs, ids, prefetch=0)
        assert dest.read_bytes() == (pg_wal / name).read_bytes(), name
        compared += 1
        dest.unlink()
    assert compared >= len(during) + len(after), (first, last, compared)
    # no archive_command here: the archive's lag is judged by what the repository holds
    status = wal_status(setup.config, "app", locs, datetime.now(timezone.utc), [])
    assert status.archive_lag_s == 0.0 and status.gaps == [] and status.server_error is None, status


def test_slot_holding_too_much_wal_alerts_and_resolves(make_stream, receiver, monkeypatch):
    """The streamer stops; WAL is written past a tiny max_slot_wal: the observer's core function
    returns an alert naming the database, the slot and the size (and one that streaming is down);
    the WAL observer sensor sends it through the alert channels once, and the resolve once
    streaming has caught up."""
    import dagster as dg

    from dr_pipelines.core.units import human_size
    from dr_pipelines.core.wal.stream_health import SLOT_WAL, STREAM_DOWN, StreamHealth, stream_health
    from dr_pipelines.defs.build import build_definitions
    from dr_pipelines.defs.wal.assets import WAL_OBSERVER, wal_archive_key

    setup, stream = make_stream(archive_command=False, max_slot_wal="2MB")
    set_config(setup, top={"alerts": {"chat": {"type": "webhook", "url_env": "DR_TEST_WEBHOOK", "format": "generic"}}})
    monkeypatch.setenv("DR_TEST_WEBHOOK", f"{receiver.start().url}/hook")
    pg, locs = setup.server, open_locations(setup.config)
    defs = build_definitions(setup.config, str(setup.config_path))
    instance = dg.DagsterInstance.ephemeral()
    cursor = None

    def tick():
        nonlocal cursor
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
        ) as ctx:
            result = defs.resolve_sensor_def(WAL_OBSERVER).evaluate_tick(ctx)
        cursor = result.cursor
        return result

    def health():
        return stream_health(setup.config, "app", locs, datetime.now(timezone.utc))

    stream.start().wait_streaming()
    with connect(pg.port) as conn:
        conn.execute("CREATE TABLE t (g int, h text)")
        _switch(conn)
    h = wait_for(lambda: (h := health()).up and h.lag_bytes == 0 and h, "streaming caught up")
    assert isinstance(h, StreamHealth)
    assert h.alerts[f"{SLOT_WAL}:app"] is None and h.retained_bytes is not None and h.retained_bytes < 2 << 20
    tick()
    assert receiver.bodies("/hook") == []

    assert stream.stop() == 0
    with connect(pg.port) as conn:
        for _ in range(4):
            _switch(conn)
        row = slot_row(conn)
    assert row is not None and row[3] > 2 << 20
    h = health()
    slot_alert, down = h.alerts[f"{SLOT_WAL}:app"], h.alerts[f"{STREAM_DOWN}:app"]
    assert slot_alert is not None and down is not None and h.up is False
    assert "app" in slot_alert.title and "dr_pipelines_app" in slot_alert.title
    assert (
        h.retained_bytes is not None
        and human_size(h.retained_bytes) in slot_alert.title
        and "limit 2.0 MB" in slot_alert.title
    )
    assert "pg_drop_replication_slot('dr_pipelines_app')" in slot_alert.detail
    assert h.lag_bytes is not None and h.lag_bytes > 3 << 20  # the archive is behind by what was written

    status = setup.cli("status", "--json")  # the shell's health monitor says the same
    checks = {c["check"]: c for c in json.loads(status.stdout)["checks"] if c["database"] == "app"}
    assert status.returncode == 2 and checks["slot_wal_within_limit"]["status"] == "error"
    assert (
        checks["wal_stream_up"]["status"] == "error"
        and "dr_pipelines_app" in checks["slot_wal_within_limit"]["description"]
    )

    result = tick()
    sent = receiver.bodies("/hook")
    assert sorted((b["event"], b["key"]) for b in sent) == [("trigger", "slot_wal:app"), ("trigger", "stream_down:app")]
    [observed] = [e for e in result.asset_events if e.asset_key == wal_archive_key("app")]
    assert observed.metadata["stream_up"].value == 0
    assert number(observed.metadata["slot_retained_bytes"].value) > 2 << 20
    tick()
    assert len(receiver.bodies("/hook")) == 2  # one alert per incident, not one per tick

    stream.start().wait_streaming()
    wait_for(lambda: (h := health()).alerts[f"{SLOT_WAL}:app"] is None and h.up, "the slot caught up", 30)
    tick()
    resolved = [(b["event"], b["key"]) for b in receiver.bodies("/hook")[2:]]
    assert sorted(resolved) == [("resolve", "slot_wal:app"), ("resolve", "stream_down:app")]
    assert stream.stop() == 0


def test_a_location_down_while_streaming_is_filled_when_it_returns(make_stream, s3, tmp_path):
    """S3 goes away while WAL streams (the streamer is the only archiver here): the local location
    keeps up, segments and partial alike; the status and the observer say which segments S3 lacks;
    when S3 answers again the streamer fills the gap, byte for byte, and the alert resolves."""
    from dr_pipelines.core.wal.stream_health import STREAM_BACKLOG, stream_health

    proxy = FaultyProxy(s3.port)
    try:
        s3_loc = {**s3_location(s3), "endpoint_url": proxy.url, "read_timeout": "6s", "retry_for": "1s"}
        setup, stream = make_stream(archive_command=False, extra_locations={"s3": s3_loc})
        pg = setup.server

        def on(only: str) -> list[str]:
            return list_archive(open_locations(setup.config, only), "app").segments.get(1, [])

        def health():
            return stream_health(setup.config, "app", open_locations(setup.config), datetime.now(timezone.utc))

        stream.start().wait_streaming()
        with connect(pg.port) as conn:
            conn.execute("CREATE TABLE t (g int, h text)")
            first = _switch(conn)
            wait_for(lambda: first in on("local") and first in on("s3"), "archived on both before the outage")

            proxy.switch(False)
            during, took = [], []
            for _ in range(3):
                during.append(_switch(conn))
                switched = time.monotonic()
                wait_for(lambda: during[-1] in on("local"), f"{during[-1]} on local while S3 is down", 15)
                took.append(time.monotonic() - switched)
            # local keeps up: S3's first hung call holds the streamer for its deadline (5 s) once, not
            # for S3's 6 s timeout per file; then S3 is left to the background retries
            assert max(took) < 7.5 and sorted(took)[1] < 2.0, took
            conn.execute("INSERT INTO t VALUES (-1, 'after the last switch')")
            end = flush_lsn(conn)
        wait_for(
            lambda: (side := newest_partial(setup, "local")) and lsn_int(side["end_lsn"]) >= lsn_int(end),
            "the partial on local keeps up too",
            10,
        )
        st = wait_for(
            lambda: (st := stream.status()) and set(during) <= set(st["backlog"].get("s3", [])) and st,
            "the status names the segments S3 lacks",
        )
        assert isinstance(st, dict) and "s3" in st["down"] and "local" not in st["backlog"]
        assert not set(during) & set(_listed_s3(s3))  # S3 itself has none of them
        h = health()
        backlog = h.alerts[f"{STREAM_BACKLOG}:app"]
        assert backlog is not None and "s3" in backlog.title and during[0] in backlog.detail
        assert h.up  # streaming itself is fine

        proxy.switch(True)
        forget_down()  # this process found S3 down too (the observer's look): it looks again
        wait_for(lambda: not stream.status()["backlog"] and not stream.status()["down"], "the gap is filled", 40)
        names = on("s3")
        assert (
            set([first, *during]) <= set(names)
            and list_archive(open_locations(setup.config, "s3"), "app").gaps(1) == []
        )
        s3_only, ids = open_locations(setup.config, "s3"), load_identities(setup.config)
        for name in during:
            dest = tmp_path / name
            wal_fetch(setup.config, "app", name, dest, s3_only, ids, prefetch=0)
            assert dest.read_bytes() == (pg.cluster.data_dir / "pg_wal" / name).read_bytes(), name
        wait_for(
            lambda: (side := newest_partial(setup, "s3")) and lsn_int(side["end_lsn"]) >= lsn_int(end),
            "the partial reaches S3 again",
            10,
        )
        assert health().alerts[f"{STREAM_BACKLOG}:app"] is None
        assert "location s3 is back: filled" in stream.log()
        assert stream.stop() == 0
    finally:
        proxy.close()


def _listed_s3(s3) -> list[str]:
    """The WAL names S3 holds, asked of the server directly (not through the proxy)."""
    import boto3

    from dr_pipelines_tests.support.configs import BUCKET

    client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    return [k.rsplit("/", 1)[-1][:-5] for k in keys if k.endswith(".json") and "/wal/" in k]


def test_streaming_that_cannot_work_says_what_to_do(make_stream, make_pg, tmp_path):
    """Refused before anything is made, each with what to change: streaming off in the config, a
    user without REPLICATION (no slot is left behind), pg_receivewal missing from pg_bin_dir, a
    server whose pg_hba.conf has no replication line, a spool holding another cluster's WAL, an unknown
    key under streaming."""
    setup, _ = make_stream(archive_command=False)
    pg = setup.server
    raw = yaml.safe_load(setup.config_path.read_text())["databases"]["app"]

    def wal_stream(**changes) -> subprocess.CompletedProcess:
        whole = yaml.safe_load(setup.config_path.read_text())
        whole["databases"]["app"] = {**raw, **changes}  # each case alone
        setup.config_path.write_text(yaml.safe_dump(whole))
        return setup.cli("wal-stream", "app")

    r = wal_stream(streaming={**raw["streaming"], "enabled": False})
    assert r.returncode == 2 and "databases.app.streaming.enabled is false" in r.stderr, r.stderr

    with connect(pg.port) as conn:
        conn.execute("CREATE ROLE reader LOGIN")
    r = wal_stream(user="reader")
    assert r.returncode == 2 and "role 'reader'" in r.stderr and "lacks the REPLICATION attribute" in r.stderr
    assert "ALTER ROLE reader REPLICATION" in r.stderr, r.stderr
    with connect(pg.port) as conn:
        assert slot_row(conn) is None  # nothing made

    empty = tmp_path / "bin"
    empty.mkdir()
    r = wal_stream(pg_bin_dir=str(empty))
    assert r.returncode == 2 and f"pg_receivewal is not in databases.app.pg_bin_dir ({empty})" in r.stderr, r.stderr

    strict = make_pg(hba="local all all trust\nhost all all 127.0.0.1/32 trust\n")  # no replication line
    r = wal_stream(port=strict.port, dbname="postgres")
    assert r.returncode == 2 and "cannot open a replication connection" in r.stderr, r.stderr
    assert "host replication postgres" in r.stderr and "pg_hba.conf" in r.stderr

    # a spool left by another cluster (the server was replaced): pushing it would be refused forever
    with connect(pg.port) as conn:
        current = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    foreign = bytearray((pg.cluster.data_dir / "pg_wal" / current).read_bytes()[:8192])
    foreign[24:32] = (int.from_bytes(foreign[24:32], "little") + 1).to_bytes(8, "little")
    spool = state_dir(setup.config, "app") / "wal"
    spool.mkdir(parents=True, exist_ok=True)
    (spool / f"{current}.partial").write_bytes(bytes(foreign))
    r = wal_stream()
    assert r.returncode == 2 and "the spool was another cluster's" in r.stderr and current in r.stderr, r.stderr
    with connect(pg.port) as conn:
        assert slot_row(conn) is None  # refused before the slot: none left holding WAL
    (spool / f"{current}.partial").unlink()

    r = wal_stream(streaming={**raw["streaming"], "slot_nmae": "x"})
    assert r.returncode == 2 and "databases.app.streaming.slot_nmae: unknown key" in r.stderr, r.stderr
    r = wal_stream(streaming={**raw["streaming"], "max_slot_wal": "lots"})
    assert r.returncode == 2 and "databases.app.streaming.max_slot_wal: 'lots' is not a size" in r.stderr


def test_synchronous_streaming_commits_wait_for_the_streamer_and_lose_nothing(make_stream, restored_dirs):
    """synchronous: true, and the server set as wal-stream says: a commit waits for the streamer's
    flush (with the streamer stopped it blocks; started again, it completes); after kill -9 of
    the primary, every commit that returned is in the recovery."""
    setup, stream = make_stream(archive_command=False, synchronous=True)
    pg = setup.server
    pg_config = setup.cli("pg-config", "app")
    assert pg_config.returncode == 0 and "synchronous_standby_names = '\"dr_pipelines_app\"'" in pg_config.stdout

    stream.start().wait_streaming()
    log = stream.log()
    assert "application_name dr_pipelines_app, synchronous" in log and "--synchronous" in log
    [hint] = [ln for ln in log.splitlines() if "synchronous_standby_names" in ln]
    statements = hint.split("run on the primary: ", 1)[1]
    assert "ALTER SYSTEM SET synchronous_standby_names = '\"dr_pipelines_app\"';" in statements
    with connect(pg.port) as conn:
        for statement in statements.split(";"):  # as the operator would, from the message
            if statement.strip():
                conn.execute(statement)
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'dr_pipelines_app'"
                ).fetchone()
                == ("sync",)
            ),
            "the streamer is the synchronous standby",
        )
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    base = run_base_backup(setup.config, "app", open_locations(setup.config)).manifest

    # the streamer stopped: a commit waits for it
    assert stream.stop() == 0
    finished = threading.Event()

    def commit():
        with connect(pg.port) as c:
            c.execute("INSERT INTO orders VALUES (0)")
        finished.set()

    waiter = threading.Thread(target=commit)
    waiter.start()
    with connect(pg.port) as conn:
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchone()[0],
            "the commit waits for the synchronous standby",
        )
    time.sleep(1.0)
    assert not finished.is_set(), "a commit returned while no streamer had it"
    stream.start().wait_streaming()
    assert finished.wait(15), "the commit did not complete once the streamer was back"
    waiter.join()

    committed = [0]
    with connect(pg.port) as conn:
        for i in range(1, 101):
            conn.execute("INSERT INTO orders VALUES (%s)", (i,))
            committed.append(i)
        end = flush_lsn(conn)
    kill_cluster(pg.cluster)  # at once: nothing else is flushed or sent
    wait_for(
        lambda: (side := newest_partial(setup)) and lsn_int(side["end_lsn"]) >= lsn_int(end),
        "the streamer pushes what it had flushed",
        10,
    )
    shutil.rmtree(pg.cluster.data_dir)
    assert stream.stop() == 0, stream.log()[-3000:]

    report = pitr_latest(setup, restored_dirs)
    assert report["backup_id"] == base.id
    with connect(report["port"]) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")] == committed


def _fake_segment(number: int, sysid: int = 7000000000000000001, size: int = 1 << 20, fill: bytes = b"w") -> bytes:
    """Bytes with a segment's long page header (enough for the archive's checks), then data, then zeros."""
    import struct

    head = struct.pack("<HHIQI", 0xD10D, 0x0002, 1, number * size, 0).ljust(24, b"\0")
    head += struct.pack("<QII", sysid, size, 8192)
    body = head + fill * 1000
    return body + b"\0" * (size - len(body))


def test_wal_fetch_serves_the_streamed_partial_only_as_the_newest_wal(tmp_path):
    """The rules that keep a partial from passing for a segment: wal-fetch serves
    <segment>.stream.partial only when asked (--partial), only when the whole segment is archived
    nowhere, and only when nothing later is archived on its timeline (never over a gap); a whole
    segment always wins; prefetch never takes it; PostgreSQL's own .partial is another file; the
    integrity check neither flags a partial replaced nor one removed under it."""
    from dr_pipelines.core.config import parse_config
    from dr_pipelines.core.postgres.wal_names import segment_name
    from dr_pipelines.core.wal.archive import WalNotFound, verify_wal
    from dr_pipelines.core.wal.push import (
        drop_streamed_partial,
        prepare_streamed_partial,
        store_streamed_partial,
        wal_push,
    )

    config = parse_config(
        {
            "databases": {"app": {"dbname": "app"}},
            "locations": {"local": {"type": "local", "path": str(tmp_path / "r")}},
        }
    )
    locs = open_locations(config)
    spool = tmp_path / "spool"
    spool.mkdir()
    names = [segment_name(1, n, 1 << 20) for n in range(0x20, 0x24)]  # 20, 21, 22, 23

    def whole(name: str) -> None:
        (spool / name).write_bytes(_fake_segment(int(name[16:], 16)))
        wal_push(config, "app", spool / name, locs)

    def partial(name: str, fill: bytes = b"p") -> bytes:
        data = _fake_segment(int(name[16:], 16), fill=fill)
        (spool / f"{name}.partial").write_bytes(data)
        store_streamed_partial(
            locs["local"], "app", prepare_streamed_partial(config, "app", spool / f"{name}.partial", None)
        )
        return data

    def fetch(name: str, partial: bool = True) -> bytes:
        dest = tmp_path / "RECOVERYXLOG"
        wal_fetch(config, "app", name, dest, locs, retries=0, partial=partial, prefetch=4)
        return dest.read_bytes()

    whole(names[0])
    tip = partial(names[1])
    assert fetch(names[1]) == tip  # the newest WAL: served when asked for
    with pytest.raises(WalNotFound):
        fetch(names[1], partial=False)  # never unless asked
    assert not (tmp_path / ".dr_pipelines_prefetch" / names[1]).exists()  # prefetch after names[0]: not taken
    fetch(names[0])
    assert not (tmp_path / ".dr_pipelines_prefetch" / names[1]).exists()

    grown = partial(names[1], fill=b"q")  # replaced as it grows
    assert fetch(names[1]) == grown and grown != tip
    assert verify_wal(locs, "app", None) == (2, [])  # the whole segment and the partial, read back

    whole(names[3])  # a later segment archived: names[1] and names[2] are a gap, not the end
    with pytest.raises(WalNotFound):
        fetch(names[1])
    whole(names[1])  # the whole segment wins over its partial
    assert fetch(names[1]) == (spool / names[1]).read_bytes()

    # wal-stream removes the partial once its segment is archived whole; a check listing it meanwhile is fine
    assert drop_streamed_partial("app", names[1], locs, config) == []
    archive = list_archive(locs, "app")
    assert names[1] + STREAM_SUFFIX not in archive.files and archive.gaps(1) == [(names[2], names[2])]

    # PostgreSQL's own <segment>.partial (archived by a promoted server) and wal-stream's of the same
    # segment are two files: neither refuses nor replaces the other
    (spool / f"{names[2]}.partial").write_bytes(_fake_segment(0x22, fill=b"x"))
    wal_push(config, "app", spool / f"{names[2]}.partial", locs)
    partial(names[2], fill=b"y")
    archive = list_archive(locs, "app")
    assert archive.files[f"{names[2]}.partial"].kind == "partial"
    assert archive.files[names[2] + STREAM_SUFFIX].kind == "streamed"


def _two_local(tmp_path: Path):
    from dr_pipelines.core.config import parse_config

    config = parse_config(
        {
            "databases": {"app": {"dbname": "app"}},
            "locations": {
                "a": {"type": "local", "path": str(tmp_path / "a")},
                "b": {"type": "local", "path": str(tmp_path / "b")},
            },
        }
    )
    spool = tmp_path / "spool"
    spool.mkdir()
    return config, open_locations(config), spool


def _prepared(config, spool: Path, name: str, body: int):
    """A partial of segment `name` holding `body` x 1000 bytes of WAL after its header."""
    from dr_pipelines.core.wal.push import prepare_streamed_partial

    path = spool / f"{name}.partial"
    path.write_bytes(_fake_segment(int(name[16:], 16), fill=b"w" * body))
    return prepare_streamed_partial(config, "app", path, None)


def test_wal_fetch_serves_only_the_longest_streamed_partial_and_replacements_are_atomic(tmp_path):
    """A partial is replaced by writing a new object (named after its content) and switching the
    sidecar to it: the old sidecar never meets the new bytes, and the old object goes only after the
    switch. A reader that cannot read the longest copy (its object gone under the sidecar it read,
    or its sidecar unreadable) is told to retry (WalFetchAborted), never served a shorter copy from
    another location. A shorter partial never replaces a longer one."""
    from dr_pipelines.core.wal.archive import WalFetchAborted
    from dr_pipelines.core.wal.push import NEWER_THERE, SAME, STORED, store_streamed_partial

    config, locs, spool = _two_local(tmp_path)
    name = segment_name(1, 0x30, 1 << 20)
    side_key = f"app/wal/00000001/{name}{STREAM_SUFFIX}.json"
    short, long = _prepared(config, spool, name, 1), _prepared(config, spool, name, 3)
    assert lsn_int(long.end_lsn) > lsn_int(short.end_lsn)
    assert short.side["object"]["name"] != long.side["object"]["name"]  # named after the content

    # atomic replacement on one location: new object, sidecar switched, old object removed
    assert store_streamed_partial(locs["a"], "app", short) == STORED
    old_side = _read_json(locs["a"], side_key)
    assert store_streamed_partial(locs["a"], "app", long) == STORED
    assert _read_json(locs["a"], side_key)["object"]["name"] == long.side["object"]["name"]
    assert not (tmp_path / "a" / "app/wal/00000001" / old_side["object"]["name"]).exists()
    assert store_streamed_partial(locs["a"], "app", long) == SAME
    # a shorter copy (a stale spool, a second wal-stream) never replaces it
    assert store_streamed_partial(locs["a"], "app", short) == NEWER_THERE
    assert _read_json(locs["a"], side_key)["end_lsn"] == long.end_lsn
    assert list_archive(locs, "app").problems == []  # the content-named object counts as the file

    def fetch() -> bytes:
        dest = tmp_path / "RECOVERYXLOG"
        wal_fetch(config, "app", name, dest, locs, retries=0, backoff_s=0, partial=True)
        return dest.read_bytes()

    store_streamed_partial(locs["b"], "app", short)
    longest = _fake_segment(0x30, fill=b"w" * 3)
    assert fetch() == longest  # a's copy, not b's shorter one

    # a reader holding the old sidecar after a replacement finds no object: retried, not b's shorter copy
    a_obj = tmp_path / "a" / "app/wal/00000001" / long.side["object"]["name"]
    saved = a_obj.read_bytes()
    a_obj.unlink()
    with pytest.raises(WalFetchAborted):
        fetch()
    a_obj.write_bytes(saved)
    # an unreadable sidecar may be the longest copy: retried, not skipped
    good = (tmp_path / "a" / side_key).read_bytes()
    (tmp_path / "a" / side_key).write_bytes(b"{not json")
    with pytest.raises(WalFetchAborted):
        fetch()
    (tmp_path / "a" / side_key).write_bytes(good)
    assert fetch() == longest


def test_wal_fetch_partial_finds_a_segment_completed_during_the_tip_check(tmp_path):
    """wal-fetch --partial asks for segment N, not archived yet; before it looks at N's partial,
    wal-stream archives N whole, drops N's partial and starts N+1's. N must be served (it is
    archived), not answered "not found" (recovery would end at N-1)."""
    from dr_pipelines.core.wal.push import drop_streamed_partial, store_streamed_partial, wal_push

    config, locs, spool = _two_local(tmp_path)
    del locs["b"]
    n, n1 = segment_name(1, 0x40, 1 << 20), segment_name(1, 0x41, 1 << 20)
    (spool / n).write_bytes(_fake_segment(0x40, fill=b"z"))
    store_streamed_partial(locs["a"], "app", _prepared(config, spool, n, 1))

    class Racing:
        """Location "a", where wal-stream completes N just as the tip check reads N's partial."""

        def __init__(self, loc):
            self.loc, self.raced = loc, False

        def __getattr__(self, attr):
            return getattr(self.loc, attr)

        def get_bytes(self, key: str) -> bytes:
            if key.endswith(f"{n}{STREAM_SUFFIX}.json") and not self.raced:
                self.raced = True
                wal_push(config, "app", spool / n, {"a": self.loc})
                drop_streamed_partial("app", n, {"a": self.loc}, config)
                store_streamed_partial(self.loc, "app", _prepared(config, spool, n1, 1))
            return self.loc.get_bytes(key)

    racing: dict = {"a": Racing(locs["a"])}
    dest = tmp_path / "RECOVERYXLOG"
    wal_fetch(config, "app", n, dest, racing, retries=0, backoff_s=0, partial=True)
    assert racing["a"].raced and dest.read_bytes() == (spool / n).read_bytes()


def _streamer(tmp_path: Path, monkeypatch, locations: dict | None = None):
    """A WalStreamer with no server and no pg_receivewal: for its pushes of the spool's partial."""
    from dr_pipelines.core.config import parse_config
    from dr_pipelines.core.wal import stream

    config = parse_config(
        {
            "databases": {"app": {"dbname": "app", "streaming": {"enabled": True, "spool_dir": str(tmp_path / "st")}}},
            "locations": {"a": {"type": "local", "path": str(tmp_path / "a")}},
        }
    )
    monkeypatch.setattr(stream, "receivewal_path", lambda config, database: "pg_receivewal")
    locs = locations or open_locations(config)
    said: list[str] = []
    setup = stream.ServerSetup("dr_pipelines_app", False, "u", None)
    streamer = stream.WalStreamer(config, "app", locs, threading.Event(), said.append, setup, None)
    streamer.spool.mkdir(parents=True)
    return streamer, said


def _finish(streamer) -> int:
    done = threading.Thread(target=lambda: None)
    done.start()
    return streamer._finish(done)


def test_wal_stream_pushes_a_partial_whose_size_and_mtime_did_not_change(tmp_path, monkeypatch):
    """pg_receivewal pre-pads its .partial (the size never changes) and an mtime can be coarse:
    WAL written between two pushes with the same (mtime, size) is still pushed, as it is by the
    last push when wal-stream stops."""
    streamer, _ = _streamer(tmp_path, monkeypatch)
    name = segment_name(1, 0x50, 1 << 20)
    path = streamer.spool / f"{name}.partial"
    path.write_bytes(_fake_segment(0x50, fill=b"a"))
    st = path.stat()
    streamer._push_partial(force=True)
    side_key = f"app/wal/00000001/{name}{STREAM_SUFFIX}.json"
    first = _read_json(streamer.locations["a"], side_key)["end_lsn"]
    path.write_bytes(_fake_segment(0x50, fill=b"a" * 2))  # more WAL, same size, same mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    streamer._push_partial(force=True)
    second = _read_json(streamer.locations["a"], side_key)["end_lsn"]
    assert lsn_int(second) > lsn_int(first)
    path.write_bytes(_fake_segment(0x50, fill=b"a" * 3))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _finish(streamer) == 0
    assert lsn_int(_read_json(streamer.locations["a"], side_key)["end_lsn"]) > lsn_int(second)


def test_wal_stream_exits_1_when_the_newest_partial_is_nowhere(tmp_path, monkeypatch):
    """The last push of the partial failing on every location, or the partial failing to be read
    or prepared, is a failure: exit 1, saying what is missing where (not 0 because an older
    version of it was pushed)."""
    from dr_pipelines.core.config import parse_config
    from dr_pipelines.core.storage.base import LocationError

    config = parse_config(
        {"databases": {"app": {"dbname": "app"}}, "locations": {"a": {"type": "local", "path": str(tmp_path / "a")}}}
    )
    locs = open_locations(config)

    class Failing:
        def __init__(self, loc):
            self.loc, self.fail = loc, False

        def __getattr__(self, attr):
            return getattr(self.loc, attr)

        def put_bytes(self, key: str, data: bytes) -> None:
            if self.fail:
                raise LocationError("a", "disk full")
            self.loc.put_bytes(key, data)

    failing = Failing(locs["a"])
    streamer, said = _streamer(tmp_path, monkeypatch, {"a": failing})
    name = segment_name(1, 0x60, 1 << 20)
    path = streamer.spool / f"{name}.partial"
    path.write_bytes(_fake_segment(0x60, fill=b"a"))
    streamer._push_partial(force=True)
    assert streamer.pushed_partial and streamer.pushed_partial["locations"] == ["a"]
    path.write_bytes(_fake_segment(0x60, fill=b"a" * 2))  # grew; its last push fails
    failing.fail = True
    assert _finish(streamer) == 1
    assert any("a lacks the newest partial segment" in m and "disk full" in m for m in said), said

    failing.fail = False
    streamer2, said2 = _streamer(tmp_path / "2", monkeypatch, {"a": failing})
    bad = streamer2.spool / f"{segment_name(1, 0x61, 1 << 20)}.partial"
    bad.write_bytes(b"\1" * 100 + b"\0" * 1000)  # not WAL: it cannot be prepared
    assert _finish(streamer2) == 1
    assert any("lacks the newest partial segment" in m for m in said2), said2


def test_two_pushes_of_one_segment_at_once_both_succeed(tmp_path):
    """archive_command and wal-stream push the same segment within milliseconds: the one that finds
    the other's object without its sidecar yet waits for the sidecar and, the content being the
    same, reports it already archived (not "another push is in progress", which fails
    archive_command and marks the location down in wal-stream). A stale leftover replaced by
    another pusher meanwhile is not deleted."""
    from dr_pipelines.core.wal.archive import WalError
    from dr_pipelines.core.wal.push import wal_push

    config, locs, spool = _two_local(tmp_path)
    del locs["b"]
    name = segment_name(1, 0x70, 1 << 20)
    (spool / name).write_bytes(_fake_segment(0x70))

    class Slow:
        """Location "a" for a push that dawdles between its object and its sidecar."""

        def __init__(self, loc):
            self.loc = loc

        def __getattr__(self, attr):
            return getattr(self.loc, attr)

        def create(self, key: str, data: bytes) -> bool:
            made = self.loc.create(key, data)
            if made and not key.endswith(".json"):
                time.sleep(0.5)
            return made

    slow: dict = {"a": Slow(locs["a"])}
    first = threading.Thread(target=wal_push, args=(config, "app", spool / name, slow))
    first.start()
    time.sleep(0.2)
    result = wal_push(config, "app", spool / name, locs)
    first.join()
    assert result.already == ["a"] and result.stored == []

    # a dead push's leftover (old), replaced by another pusher between our two looks: not deleted
    other = segment_name(1, 0x71, 1 << 20)
    (spool / other).write_bytes(_fake_segment(0x71))
    from dr_pipelines.core.wal.archive import object_name

    key = tmp_path / "a" / "app/wal/00000001" / object_name(other, config)
    key.write_bytes(b"left by a push that died")
    os.utime(key, (time.time() - 600, time.time() - 600))

    class Replacing:
        def __init__(self, loc):
            self.loc, self.lists = loc, 0

        def __getattr__(self, attr):
            return getattr(self.loc, attr)

        def list(self, prefix: str = ""):
            listed = list(self.loc.list(prefix))
            if prefix.endswith(key.name):
                self.lists += 1
                if self.lists == 1:  # right after our first look, another pusher replaces it
                    key.write_bytes(b"another pusher's fresh object")
            return iter(listed)

    replacing: dict = {"a": Replacing(locs["a"])}
    with pytest.raises(WalError, match="in progress"):
        wal_push(config, "app", spool / other, replacing)
    assert key.read_bytes() == b"another pusher's fresh object"


def test_observer_says_streaming_is_down_when_the_archive_stops_moving(tmp_path, monkeypatch):
    """Seen from another host (no status.json), with pg_receivewal connected to the slot but every
    push failing, the archive falls behind the server: from the repository alone, past
    max(60 s, 3 x partial_interval), streaming counts as down (alert, and wal_stream_up fails)."""
    from contextlib import contextmanager
    from datetime import timedelta

    from dr_pipelines.core.config import parse_config
    from dr_pipelines.core.postgres import client
    from dr_pipelines.core.wal.push import wal_push
    from dr_pipelines.core.wal.stream_health import STREAM_DOWN, stream_health, stream_outcomes

    config = parse_config(
        {
            "databases": {"app": {"dbname": "app", "streaming": {"enabled": True, "spool_dir": str(tmp_path / "st")}}},
            "locations": {"a": {"type": "local", "path": str(tmp_path / "a")}},
        }
    )
    locs = open_locations(config)
    name = segment_name(1, 0x80, 1 << 20)
    (tmp_path / name).write_bytes(_fake_segment(0x80))
    wal_push(config, "app", tmp_path / name, locs)
    pushed = datetime.now(timezone.utc)

    class Conn:
        def execute(self, *a, **k):
            return self

        def fetchone(self):  # the server is at segment 0x82; the slot is active, pg_receivewal connected
            return (
                "0/8200100",
                segment_name(1, 0x82, 1 << 20),
                True,
                True,
                "reserved",
                3 << 20,
                "streaming",
                "async",
                "0/8200100",
                "now",
            )

    @contextmanager
    def connect(*a, **k):
        yield Conn()

    monkeypatch.setattr(client, "connect", connect)
    fresh = stream_health(config, "app", locs, pushed + timedelta(seconds=20))
    assert fresh.lag_bytes and fresh.alerts[f"{STREAM_DOWN}:app"] is None  # behind, but not for long
    late = stream_health(config, "app", locs, pushed + timedelta(seconds=90))
    alert = late.alerts[f"{STREAM_DOWN}:app"]
    assert alert is not None and "not moved" in alert.detail
    [up] = [o for o in stream_outcomes(late) if o.check == "wal_stream_up"]
    assert not up.passed


def test_pitr_latest_end_check_counts_the_newest_streamed_partial(tmp_path):
    """Recovery to the newest point that stops before the newest streamed partial (after the newest
    whole segment) is reported as ended before the end of the archive."""
    from dr_pipelines.core.pitr.recover import PitrReport, end_of_archive_check
    from dr_pipelines.core.wal.push import store_streamed_partial, wal_push

    config, locs, spool = _two_local(tmp_path)
    del locs["b"]
    whole, tip = segment_name(1, 0x90, 1 << 20), segment_name(1, 0x91, 1 << 20)
    (spool / whole).write_bytes(_fake_segment(0x90))
    wal_push(config, "app", spool / whole, locs)
    store_streamed_partial(locs["a"], "app", _prepared(config, spool, tip, 1))
    report = PitrReport("app", "latest", str(tmp_path / "d"), 5432, "now")
    report.reached_lsn = "0/90FFFF8"  # in the whole segment: the partial after it was not replayed
    behind = end_of_archive_check(locs, "app", report)
    assert behind and tip + STREAM_SUFFIX in behind
    report.reached_lsn = "0/9100100"  # into the partial: the end
    assert end_of_archive_check(locs, "app", report) is None


def test_a_long_database_name_neither_breaks_the_observer_nor_passes_config_load_when_streamed(tmp_path):
    """The default slot name dr_pipelines_<db> can exceed 63 characters: with streaming off the
    observer still answers for that database (no slot of that name can exist); with streaming on
    the config is refused when loaded, saying to set streaming.slot."""
    from dr_pipelines.core.config import parse_config
    from dr_pipelines.core.wal.stream_health import stream_health

    long_name = "a" * 55

    def config(enabled: bool):
        return parse_config(
            {
                "databases": {long_name: {"dbname": "app", "streaming": {"enabled": enabled}}},
                "locations": {"a": {"type": "local", "path": str(tmp_path / "a")}},
            }
        )

    off = config(False)
    h = stream_health(off, long_name, open_locations(off), datetime.now(timezone.utc), server_down="not asked")
    assert not h.enabled and h.up is None
    with pytest.raises(Exception, match="streaming.slot"):
        config(True)
