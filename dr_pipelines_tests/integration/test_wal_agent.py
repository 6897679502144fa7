"""The resident archiver (issue 14): PostgreSQL's archive_command hands its segments to a long-lived
agent per cluster and config, which answers only once they are durable everywhere; whatever happens
to the agent, the command pushes by itself and the contract holds."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dr_pipelines.core.codec.keys import load_identities
from dr_pipelines.core.postgres.cluster import run_as_postgres
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines.core.wal.agent_client import NotListening, agent_stem, request
from dr_pipelines.core.wal.archive import list_archive
from dr_pipelines.core.wal.fast_path import mark_pushed, push_context
from dr_pipelines.core.wal.fetch import wal_fetch
from dr_pipelines_tests.support.configs import config_from, s3_location
from dr_pipelines_tests.support.processes import VENV_BIN, run_cli, wait_for
from dr_pipelines_tests.support.servers import FaultyProxy
from dr_pipelines_tests.support.wal import WalSetup

AGENT_MODULE = "dr_pipelines.core.wal.agent"


# --------------------------------------------------------------------------- helpers


WAL_CLIENT = VENV_BIN / "dr-pipelines-wal"  # what PostgreSQL runs (pg_config.wal_command)


def stem_of(data_dir: Path, config_path: Path, db: str | None = "app") -> str:
    """The agent's files (without suffix) for the cluster in `data_dir`, as its owner sees them."""
    return agent_stem(str(data_dir / "pg_wal"), push_context(str(config_path.resolve()), db), data_dir.stat().st_uid)


def status(stem: str) -> dict | None:
    try:
        return request(stem + ".sock", {"status": True}, timeout=10)
    except NotListening:
        return None


def wait_for_agent(stem: str, served: int = 0, not_pid: int | None = None) -> dict:
    def ready():
        st = status(stem)
        return st if st and st["served"] >= served and st["pid"] != not_pid else None

    found = wait_for(ready, f"an agent on {stem}.sock serving {served}")
    assert isinstance(found, dict)
    return found


def agent_pids(pg_wal: Path) -> list[int]:
    """Live agents serving `pg_wal` (from their command lines)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if AGENT_MODULE.encode() in argv and str(pg_wal).encode() in argv:
                pids.append(int(entry))
    return pids


def gone(pid: int) -> bool:
    """Exited (an orphan's zombie counts: the container's init may not reap it at once)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def set_wal(setup: WalSetup, **wal) -> None:
    raw = yaml.safe_load(setup.config_path.read_text())
    raw["wal"].update(wal)
    setup.config_path.write_text(yaml.safe_dump(raw))
    setup.config = config_from(setup.config_path)


def switch(setup: WalSetup, n: int) -> list[str]:
    return [setup.switch_and_wait() for _ in range(n)]


def assert_archive_holds(setup: WalSetup, names: list[str], tmp_path: Path, only: str | None = None) -> None:
    """Every name is archived (no gap) and comes back byte for byte as the cluster wrote it."""
    locs = open_locations(setup.config, only)
    archive = list_archive(locs, "app")
    assert set(names) <= set(archive.segments[1]) and archive.gaps(1) == [] and archive.problems == []
    for name in names:
        dest = tmp_path / f"fetched-{name}"
        wal_fetch(setup.config, "app", name, dest, locs, load_identities(setup.config), prefetch=0)
        assert dest.read_bytes() == (setup.server.cluster.data_dir / "pg_wal" / name).read_bytes(), name
        dest.unlink()


@pytest.fixture
def agents() -> Iterator[list[Path]]:
    """pg_wal directories whose agents the test may have started. At the end (their cluster stopped
    or their config removed) they leave by themselves, and take their files with them; any still
    there is stopped by its pid."""
    watched: list[Path] = []
    yield watched
    deadline = time.monotonic() + 5
    while any(agent_pids(p) for p in watched) and time.monotonic() < deadline:
        time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [pid for p in watched for pid in agent_pids(p)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(agent_pids(p) for p in watched) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture
def wal_setup(pg, agents) -> Iterator[WalSetup]:
    setup = WalSetup(pg)
    agents.append(pg.cluster.data_dir / "pg_wal")
    yield setup
    setup.cleanup()


# --------------------------------------------------------------------------- the agent at work


def test_postgres_archives_through_the_agent(wal_setup, tmp_path):
    """The first call pushes by itself and starts the agent; the next ones are served by that one
    agent (same pid), in its private directory; the archive holds every segment, byte for byte."""
    data_dir = wal_setup.server.cluster.data_dir
    stem = stem_of(data_dir, wal_setup.config_path)
    wal_setup.enable_archiving()
    first = wal_setup.switch_and_wait()
    agent = wait_for_agent(stem)
    names = switch(wal_setup, 4)
    after = wait_for_agent(stem)
    assert after["pid"] == agent["pid"]
    assert after["served"] - agent["served"] + after["taken_ahead"] >= len(names) and after["failed"] == 0
    assert after["pg_wal"] == str(data_dir / "pg_wal")
    d = Path(stem).parent
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == data_dir.stat().st_uid
    sock = Path(stem + ".sock").stat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert "serving" in Path(stem + ".log").read_text()

    # a burst: several segments ready at once; the agent answers one and archives the rest ahead
    with wal_setup.server.connect() as conn:
        conn.execute(
            "DO $$ BEGIN FOR i IN 1..5 LOOP INSERT INTO t SELECT generate_series(1, 1000); "
            "PERFORM pg_switch_wal(); END LOOP; END $$"
        )
    names += switch(wal_setup, 1)
    assert wait_for_agent(stem)["pid"] == agent["pid"]
    with wal_setup.server.connect() as conn:
        last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
    burst = [p.name for p in (data_dir / "pg_wal").iterdir() if len(p.name) == 24 and first <= p.name <= last]
    assert_archive_holds(wal_setup, sorted({first, *names, *burst}), tmp_path)

    # the agent refuses what is not its own: another context, another directory
    segment = str(data_dir / "pg_wal" / names[0])
    other = request(stem + ".sock", {"push": segment, "context": push_context(str(tmp_path / "x.yaml"), "app")})
    assert other["ok"] is False and "refused" in other["error"]
    elsewhere = tmp_path / names[0]
    shutil.copy(segment, elsewhere)
    ctx = push_context(str(wal_setup.config_path.resolve()), "app")
    moved = request(stem + ".sock", {"push": str(elsewhere), "context": ctx})
    assert moved["ok"] is False and "not in" in moved["error"]
    assert request(stem + ".sock", {"push": segment, "context": ctx}) == {"ok": True}  # already there, identical

    # the cluster stops: its agent leaves, and takes its socket, lock and log with it
    wal_setup.server.cluster.stop("fast")
    wait_for(lambda: gone(agent["pid"]), "the agent exits with its cluster", 15)
    assert not [p for p in Path(stem).parent.glob(Path(stem).name + ".*")]


def test_the_agent_keeps_the_contract(wal_setup, agents, tmp_path):
    """Through the agent, as through the command: an identical re-push succeeds, different bytes
    and a foreign cluster are refused (exit 1, nothing written), segments it archived ahead take
    the marker fast path."""
    wal_setup.enable_archiving()
    names = switch(wal_setup, 3)
    source = wal_setup.server.cluster.data_dir
    data = tmp_path / "data"  # a data directory of our own, so this test's own calls run the agent
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    (data / "global").mkdir()
    shutil.copy(source / "global" / "pg_control", data / "global" / "pg_control")
    (data / "postmaster.pid").write_text("4242\n")
    pg_wal = data / "pg_wal"
    agents.append(pg_wal)
    raw = yaml.safe_load(wal_setup.config_path.read_text())
    raw["locations"] = {"local": {"type": "local", "path": str(tmp_path / "repo")}}
    config_path = tmp_path / "dr.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = config_from(config_path)
    stem = stem_of(data, config_path)

    def push(name: str, env: dict | None = None):
        return run_cli("--config", str(config_path), "wal-push", "--db", "app", str(pg_wal / name), env=env)

    for name in names:
        shutil.copy(source / "pg_wal" / name, pg_wal / name)
    r = push(names[0])  # no agent yet: pushed here, and one started
    assert r.returncode == 0, r.stderr
    agent = wait_for_agent(stem)
    assert agent["served"] == 0

    # names[1] asked for, names[2] ready too: the agent archives it ahead once it has answered
    for name in names[1:]:
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    r = push(names[1])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    st = wait_for(lambda: (s := status(stem)) and s["archived_ahead"] == 1 and s, "archived ahead")
    assert isinstance(st, dict) and st["served"] == 1 and st["pushed"] == 1
    assert (pg_wal / ".dr_pipelines_pushed" / names[2]).exists()
    r = push(names[2])  # the marker's fast path: the agent is not even asked
    assert r.returncode == 0 and r.stderr == ""
    assert not (pg_wal / ".dr_pipelines_pushed" / names[2]).exists()
    assert wait_for_agent(stem)["served"] == 1

    # PostgreSQL re-archiving after a crash: the same bytes. The call imports nothing heavy.
    r = push(names[1], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "dr_pipelines.core.wal.agent_client" in imported
    assert not {m.split(".")[0] for m in imported} & {"pydantic", "yaml", "boto3", "botocore", "google", "dagster"}
    assert wait_for_agent(stem)["served"] == 2

    changed = bytearray((pg_wal / names[1]).read_bytes())
    changed[5000] ^= 0xFF
    (pg_wal / names[1]).write_bytes(bytes(changed))
    r = push(names[1])  # the agent says no; the command, pushing by itself, says no too
    assert r.returncode == 1
    assert "the archiver agent failed" in r.stderr and "already archived on local with different content" in r.stderr

    foreign = bytearray((source / "pg_wal" / names[0]).read_bytes())
    foreign[24:32] = (int.from_bytes(foreign[24:32], "little") + 1).to_bytes(8, "little")
    (pg_wal / "0000000100000000000000F0").write_bytes(bytes(foreign))
    r = push("0000000100000000000000F0")
    assert r.returncode == 1 and "comes from cluster" in r.stderr and "refusing to mix" in r.stderr
    assert not list((tmp_path / "repo").rglob("0000000100000000000000F0*"))
    st = wait_for_agent(stem)
    assert st["pid"] == agent["pid"] and st["failed"] == 2 and st["served"] == 2

    locs = open_locations(config)
    assert list_archive(locs, "app").segments == {1: names}
    for name in names:
        wal_fetch(config, "app", name, tmp_path / "back", locs, load_identities(config), prefetch=0)
        assert (tmp_path / "back").read_bytes() == (source / "pg_wal" / name).read_bytes()

    (data / "postmaster.pid").write_text("4243\n")  # "the cluster restarted" (its commands' environment may differ)
    wait_for(lambda: gone(agent["pid"]), "the agent exits when its cluster restarts", 15)
    assert "was restarted" in Path(stem + ".log").read_text()
    r = push(names[0])
    assert r.returncode == 0, r.stderr
    fresh = wait_for_agent(stem)
    assert fresh["pid"] != agent["pid"]

    (data / "postmaster.pid").unlink()  # "the cluster stopped": the agent goes, with its files
    wait_for(lambda: gone(fresh["pid"]), "the agent exits when its cluster is not running", 15)
    assert not list(Path(stem).parent.glob(Path(stem).name + ".*"))


def recovering_data_dir(tmp_path: Path, agents: list) -> tuple[Path, Path]:
    """A recovering cluster's data directory of our own (a postmaster.pid, recovery.signal) and its
    pg_wal, whose agent the `agents` fixture stops."""
    data = tmp_path / "data"
    pg_wal = data / "pg_wal"
    pg_wal.mkdir(parents=True)
    (data / "postmaster.pid").write_text("4242\n")
    (data / "recovery.signal").touch()
    agents.append(pg_wal)
    return data, pg_wal


def test_recovery_fetches_through_the_agent_ahead_of_replay(wal_setup, agents, tmp_path):
    """restore_command through the agent: the first call fetches by itself and starts it; a miss is
    then served by the agent, which keeps the next `prefetch` segments spooled while replay takes
    them (a rename, the agent never asked), stops at the end of the archive, answers "not found" as
    the command does (exit 1), refuses a foreign pg_wal, and removes what replay did not take once
    recovery ends. Every file handed over is the archived bytes."""
    wal_setup.enable_archiving()
    names = switch(wal_setup, 9)
    source = wal_setup.server.cluster.data_dir / "pg_wal"
    data, pg_wal = recovering_data_dir(tmp_path, agents)
    spool = pg_wal / ".dr_pipelines_prefetch"
    raw = yaml.safe_load(wal_setup.config_path.read_text())
    raw["wal"]["prefetch"] = 2
    config_path = tmp_path / "dr.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    stem = stem_of(data, config_path)

    def fetch(name: str):
        r = run_cli("--config", str(config_path), "wal-fetch", "--db", "app", name, str(pg_wal / "RECOVERYXLOG"))
        if r.returncode == 0:
            assert (pg_wal / "RECOVERYXLOG").read_bytes() == (source / name).read_bytes(), name
            (pg_wal / "RECOVERYXLOG").unlink()
        return r

    def spooled() -> set[str]:
        return {p.name for p in spool.iterdir() if not p.name.startswith(".")} if spool.exists() else set()

    r = fetch(names[0])  # no agent: fetched here (and the next two ahead, by this call), agent started
    assert r.returncode == 0 and r.stderr == "", r.stderr
    agent = wait_for_agent(stem)
    assert agent["fetched"] == 0 and spooled() == {names[1], names[2]}
    for name in names[1:3]:  # replay takes them from the spool
        assert fetch(name).returncode == 0
    r = fetch(names[3])  # a miss: the agent fetches it, then keeps two spooled ahead of replay
    assert r.returncode == 0 and r.stderr == "", r.stderr
    wait_for(lambda: spooled() == {names[4], names[5]}, "the agent spools the next two")
    assert status(stem)["fetched"] == 1
    for i in range(4, 9):  # replay takes one; the agent, never asked, spools the one after the window
        assert fetch(names[i]).returncode == 0
        ahead = set(names[i + 1 : i + 3])
        wait_for(lambda ahead=ahead: spooled() == ahead, f"{sorted(ahead)} spooled after {names[i]} was taken")
    st = wait_for(lambda: (s := status(stem)) and s["prefetch_taken"] == 5 and s, "replay's takes seen")
    assert isinstance(st, dict) and st["fetched"] == 1 and st["prefetch_spooled"] == 5, st
    assert spooled() == set()  # the archive ends at names[8]: nothing past it, no error

    missing = "0000000100000000000000F0"
    r = fetch(missing)  # not in the archive: the agent says so, the command exits 1 (end of recovery)
    assert r.returncode == 1 and "not in the WAL archive" in r.stderr and "warning" not in r.stderr
    assert status(stem)["not_found"] == 1

    ctx = push_context(str(config_path.resolve()), "app")
    other = request(stem + ".sock", {"fetch": names[0], "dest": str(tmp_path / "x"), "context": ctx})
    assert other["ok"] is False and "not in" in other["error"] and not (tmp_path / "x").exists()
    bad = request(stem + ".sock", {"fetch": "../../etc/passwd", "dest": str(pg_wal / "RECOVERYXLOG"), "context": ctx})
    assert bad["ok"] is False and not (pg_wal / "RECOVERYXLOG").exists()
    # the agent never writes where PostgreSQL reads: a client that gave up waiting (and fetched by
    # itself) must not find a late answer there; the answer is a file of its own, which a client renames
    late = request(stem + ".sock", {"fetch": names[3], "dest": str(pg_wal / "RECOVERYXLOG"), "context": ctx})
    assert late["ok"] is True and not (pg_wal / "RECOVERYXLOG").exists()
    assert (
        Path(late["staged"]).parent == spool and Path(late["staged"]).read_bytes() == (source / names[3]).read_bytes()
    )

    wal_setup.switch_and_wait()  # the archive grows; asking again spools what is new
    names.append(wal_setup.switch_and_wait())
    assert fetch(names[7]).returncode == 0  # a re-asked segment (a timeline check): served again
    wait_for(lambda: len(spooled()) == 2, "the two new segments spooled")
    (data / "recovery.signal").unlink()  # promoted: what replay did not take is removed (the orphan too)
    wait_for(lambda: not list(spool.iterdir()), "the spool emptied once recovery ended")
    assert wait_for_agent(stem)["pid"] == agent["pid"]


def test_recoverys_first_answer_not_found_starts_the_agent(wal_setup, agents, tmp_path):
    """Recovery's first restore_command call is for a timeline history file that does not exist: its
    "not found" (exit 1) is an answer, not a failure, so it starts the agent, and the segments asked
    next are served by it rather than each by a process of its own."""
    wal_setup.enable_archiving()
    names = switch(wal_setup, 1)
    source = wal_setup.server.cluster.data_dir / "pg_wal"
    data, pg_wal = recovering_data_dir(tmp_path, agents)
    stem = stem_of(data, wal_setup.config_path)

    def fetch(name: str):
        return run_cli(
            "--config", str(wal_setup.config_path), "wal-fetch", "--db", "app", name, str(pg_wal / "RECOVERYXLOG")
        )  # fmt: skip

    r = fetch("00000002.history")
    assert r.returncode == 1 and "not in the WAL archive" in r.stderr, r.stderr
    agent = wait_for_agent(stem)
    assert agent["fetched"] == 0
    r = fetch(names[0])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == (source / names[0]).read_bytes()
    assert status(stem)["fetched"] == 1  # the agent's work, not this call's


# --------------------------------------------------------------------------- failure paths


def test_agent_killed_mid_push_the_command_pushes_by_itself(pg, s3, agents, tmp_path):
    """SIGKILL while the agent is writing to S3 (the segment already on local): PostgreSQL's call
    sees the agent gone, pushes by itself and exits 0 only once the segment is on both locations;
    the archive stays consistent; the next calls start a new agent."""
    proxy = FaultyProxy(s3.port)
    setup = WalSetup(pg, {"s3": {**s3_location(s3), "endpoint_url": proxy.url}})
    agents.append(pg.cluster.data_dir / "pg_wal")
    try:
        stem = stem_of(pg.cluster.data_dir, setup.config_path)
        setup.enable_archiving()
        names = switch(setup, 1)
        agent = wait_for_agent(stem)
        names += switch(setup, 1)
        assert wait_for_agent(stem, served=1)["pid"] == agent["pid"]

        proxy.hold.set()
        with pg.connect() as conn:
            conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
            victim = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        assert proxy.held.wait(30), "the agent never wrote to S3"
        # the locations are written at once: the local copy completes while the S3 upload is held
        local_sidecar = setup.repo / "app" / "wal" / victim[:8] / f"{victim}.json"
        wait_for(local_sidecar.exists, f"{victim} on the local location", 10)
        proxy.hold.clear()  # the next uploads pass; the one held is dropped once its writer is dead
        os.kill(agent["pid"], signal.SIGKILL)
        wait_for(lambda: gone(agent["pid"]), "the agent is dead", 10)
        proxy.release()
        with pg.connect() as conn:
            try:
                wait_for(
                    lambda: (
                        (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") >= victim
                    ),
                    f"{victim} archived after the agent died",
                )
            except AssertionError as e:
                raise AssertionError(f"{e}; server log: {pg.cluster.log_file.read_text()[-3000:]}") from None
        names.append(victim)
        assert "the archiver agent did not answer" in pg.cluster.log_file.read_text()
        for only in ("local", "s3"):  # on each location alone, sidecar and object, the right bytes
            assert_archive_holds(setup, names, tmp_path, only)

        names += switch(setup, 3)  # a dead agent's socket is left: refused, so a new agent starts
        fresh = wait_for_agent(stem, not_pid=agent["pid"])
        names += switch(setup, 2)
        assert wait_for_agent(stem, served=fresh["served"] + 1)["pid"] == fresh["pid"]
        assert_archive_holds(setup, names, tmp_path)
    finally:
        proxy.close()
        setup.cleanup()


def test_agent_killed_mid_fetch_the_command_fetches_by_itself(pg, s3, agents, tmp_path):
    """SIGKILL while the agent is downloading a segment for restore_command (the compiled client,
    as PostgreSQL runs it): the call sees the agent gone, fetches by itself and puts the archived
    bytes in place; the next call starts a new agent; nothing the dead agent left is handed to
    replay, and its leftovers go once recovery ends."""
    proxy = FaultyProxy(s3.port, method=b"GET ")
    setup = WalSetup(pg, {"s3": {**s3_location(s3), "endpoint_url": proxy.url}})
    try:
        set_wal(setup, prefetch=0)  # every segment asked of the agent, none spooled ahead
        setup.enable_archiving()
        names = switch(setup, 4)
        source = pg.cluster.data_dir / "pg_wal"
        data, pg_wal = recovering_data_dir(tmp_path, agents)
        stem = stem_of(data, setup.config_path)

        def fetch(name: str) -> subprocess.CompletedProcess:
            dest = pg_wal / "RECOVERYXLOG"
            r = run_wal_client("--config", str(setup.config_path.resolve()), "wal-fetch", "--db", "app",
                               "--location", "s3", name, "pg_wal/RECOVERYXLOG", cwd=data)  # fmt: skip
            if r.returncode == 0:
                assert dest.read_bytes() == (source / name).read_bytes(), name
                dest.unlink()
            return r

        assert fetch(names[0]).returncode == 0  # no agent: fetched here, one started
        agent = wait_for_agent(stem)
        assert fetch(names[1]).returncode == 0 and status(stem)["fetched"] == 1

        proxy.hold.set()
        result: list[subprocess.CompletedProcess] = []
        caller = threading.Thread(target=lambda: result.append(fetch(names[2])))
        caller.start()
        assert proxy.held.wait(30), "the agent never read from S3"
        proxy.hold.clear()
        os.kill(agent["pid"], signal.SIGKILL)
        wait_for(lambda: gone(agent["pid"]), "the agent is dead", 10)
        proxy.release()
        caller.join(60)
        r = result[0]
        assert r.returncode == 0 and "the archiver agent did not answer" in r.stderr, r.stderr

        assert fetch(names[3]).returncode == 0  # the dead agent's socket refuses: a new one starts
        fresh = wait_for_agent(stem, not_pid=agent["pid"])
        (data / "recovery.signal").unlink()  # recovery ended: whatever is in the spool goes
        spool = pg_wal / ".dr_pipelines_prefetch"
        wait_for(lambda: not spool.exists() or not list(spool.iterdir()), "the spool emptied once recovery ended")
        assert status(stem)["pid"] == fresh["pid"]
        (data / "postmaster.pid").unlink()
    finally:
        proxy.close()
        setup.cleanup()


def test_a_stale_file_at_the_socket_path_is_replaced(wal_setup, tmp_path):
    """A stray file where the agent's socket goes: the call archives anyway, and the agent it
    starts replaces the file. A second agent for the same cluster and config leaves at once."""
    data_dir = wal_setup.server.cluster.data_dir
    owner = data_dir.stat()
    stem = stem_of(data_dir, wal_setup.config_path)
    d = Path(stem).parent
    if not d.exists():
        d.mkdir(mode=0o700)
        os.chown(d, owner.st_uid, owner.st_gid)
    Path(stem + ".sock").write_text("not a socket")
    os.chown(stem + ".sock", owner.st_uid, owner.st_gid)
    wal_setup.enable_archiving()
    names = switch(wal_setup, 1)
    agent = wait_for_agent(stem)
    assert stat.S_ISSOCK(Path(stem + ".sock").stat().st_mode)
    names += switch(wal_setup, 2)
    assert wait_for_agent(stem, served=1)["pid"] == agent["pid"]

    second = run_as_postgres(
        [str(VENV_BIN / "python"), "-m", AGENT_MODULE, "--pg-wal", str(data_dir / "pg_wal")]
        + ["--config", str(wal_setup.config_path.resolve()), "--db", "app"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    assert wait_for_agent(stem)["pid"] == agent["pid"]
    assert_archive_holds(wal_setup, names, tmp_path)


def test_two_clusters_on_one_host_get_one_agent_each(make_pg, agents, tmp_path):
    """Two clusters archiving at once: two agents, each serving its own pg_wal; each archive holds
    its own cluster's bytes only."""
    setups = []
    try:
        for _ in range(2):
            server = make_pg()
            setups.append(WalSetup(server))
            agents.append(server.cluster.data_dir / "pg_wal")
        a, b = setups
        with b.server.connect() as conn:  # so that the two clusters' WAL differs
            conn.execute("CREATE TABLE only_b AS SELECT 'b' || generate_series(1, 5000) AS x")
        stems = [stem_of(s.server.cluster.data_dir, s.config_path) for s in setups]
        assert stems[0] != stems[1]
        for s in setups:
            s.enable_archiving()
        names: list[list[str]] = [[], []]

        def switch_both():
            with b.server.connect() as conn:
                conn.execute("INSERT INTO only_b SELECT 'b' || generate_series(1, 100)")
            for i, s in enumerate(setups):
                names[i].append(s.switch_and_wait())

        switch_both()
        for stem in stems:
            wait_for_agent(stem)
        for _ in range(3):
            switch_both()
        st = [wait_for_agent(stem, served=3) for stem in stems]
        assert st[0]["pid"] != st[1]["pid"]
        assert [x["pg_wal"] for x in st] == [str(s.server.cluster.data_dir / "pg_wal") for s in setups]
        for i, s in enumerate(setups):
            assert_archive_holds(s, names[i], tmp_path)
        common = [n for n in names[0] if n in names[1]]
        assert common
        pg_wals = [s.server.cluster.data_dir / "pg_wal" for s in setups]
        assert any((pg_wals[0] / n).read_bytes() != (pg_wals[1] / n).read_bytes() for n in common)
    finally:
        for s in setups:
            s.cleanup()


def test_a_changed_config_gets_a_fresh_agent(wal_setup, tmp_path):
    """The config file changes (size, change time): the calls go to a new agent that read it; the
    old one is not asked again and leaves."""
    data_dir = wal_setup.server.cluster.data_dir
    old_stem = stem_of(data_dir, wal_setup.config_path)
    wal_setup.enable_archiving()
    names = switch(wal_setup, 1)
    wait_for_agent(old_stem)
    names += switch(wal_setup, 1)
    old = wait_for_agent(old_stem, served=1)

    time.sleep(0.01)  # a later change time, whatever the file system's clock granularity
    with open(wal_setup.config_path, "a") as f:
        f.write("# edited\n")
    new_stem = stem_of(data_dir, wal_setup.config_path)
    assert new_stem != old_stem
    wait_for(lambda: gone(old["pid"]), "the old agent leaves once its config changed", 15)
    names += switch(wal_setup, 1)
    new = wait_for_agent(new_stem)
    names += switch(wal_setup, 2)
    assert wait_for_agent(new_stem, served=1)["pid"] == new["pid"] != old["pid"]
    assert new["context"] == push_context(str(wal_setup.config_path.resolve()), "app")
    assert not Path(old_stem + ".sock").exists()
    assert_archive_holds(wal_setup, names, tmp_path)


def test_the_agent_exits_when_idle(wal_setup, tmp_path):
    set_wal(wal_setup, agent_idle="5s")  # longer than a switch and a process start on a loaded machine
    stem = stem_of(wal_setup.server.cluster.data_dir, wal_setup.config_path)
    wal_setup.enable_archiving()
    names = switch(wal_setup, 1)
    wait_for_agent(stem)
    names += switch(wal_setup, 1)
    agent = wait_for_agent(stem, served=1)
    assert agent["idle_s"] == 5
    wait_for(lambda: gone(agent["pid"]), "the idle agent exits", 15)
    assert not Path(stem + ".sock").exists()
    assert "exiting: idle for 5s" in Path(stem + ".log").read_text()
    names += switch(wal_setup, 1)  # the next call starts another
    assert wait_for_agent(stem)["pid"] != agent["pid"]
    assert_archive_holds(wal_setup, names, tmp_path)


def test_no_agent_when_the_config_turns_it_off(wal_setup, tmp_path):
    set_wal(wal_setup, agent=False)
    data_dir = wal_setup.server.cluster.data_dir
    stem = stem_of(data_dir, wal_setup.config_path)
    wal_setup.enable_archiving()
    names = switch(wal_setup, 3)
    time.sleep(1)
    d = Path(stem).parent
    assert not (d.exists() and list(d.glob(Path(stem).name + ".*")))  # no socket, lock or log: never started
    assert agent_pids(data_dir / "pg_wal") == []
    assert_archive_holds(wal_setup, names, tmp_path)


# --------------------------------------------------------------------------- the client's own checks
# No cluster needed: a fake "agent" on a socket in a directory of the test's, answering as it is told.


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch) -> Iterator[tuple[Path, Path]]:
    """A segment in a running-looking cluster's pg_wal, and this user's private agents' directory."""
    from dr_pipelines.core.wal import agent_client

    pg_wal = tmp_path / "data" / "pg_wal"
    pg_wal.mkdir(parents=True)
    (tmp_path / "data" / "postmaster.pid").write_text("12345\n")
    segment = pg_wal / "000000010000000000000001"
    segment.write_bytes(b"\0" * 1024)
    agents_dir = Path(tempfile.mkdtemp(prefix="dra-", dir="/tmp"))  # short: a socket path has 108 bytes
    agents_dir.chmod(0o700)
    monkeypatch.setattr(agent_client, "agent_dir", lambda uid=None: str(agents_dir))
    yield segment, agents_dir
    shutil.rmtree(agents_dir, ignore_errors=True)


def _fake_agent(sock_path: str, answer: bytes | None, hold: threading.Event) -> threading.Thread:
    """Accept one request; send `answer` (None: close without one), after `hold` is set."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)

    def serve():
        try:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                hold.wait(10)
                if answer is not None:
                    conn.sendall(answer)
        except OSError:
            pass  # the client gave up (hung agent), or the test closed the socket (never asked)
        finally:
            server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.server = server  # type: ignore[attr-defined]
    return thread


@pytest.mark.parametrize(
    "answer, outcome",
    [
        (b'{"ok": true}\n', "durable"),
        (b'{"ok": false, "error": "s3: down"}\n', "failed"),
        (b"not json\n", "failed"),
        (None, "failed"),  # the agent died mid-request
    ],
)
def test_the_client_believes_only_an_ok_answer(fake_cluster, answer, outcome):
    from dr_pipelines.core.wal import agent_client

    segment, _ = fake_cluster
    context = "ctx"
    sock = agent_client.agent_stem(str(segment.parent), context) + ".sock"
    released = threading.Event()
    released.set()
    thread = _fake_agent(sock, answer, released)
    got, why = agent_client.push_through_agent(str(segment), "/etc/dr.yaml", None, context)
    thread.join(5)
    assert got == outcome, why
    assert (why is None) == (outcome == "durable")


def test_a_directory_others_can_enter_is_not_used(fake_cluster):
    """Anyone able to plant a socket there could answer "durable" for a segment never archived."""
    from dr_pipelines.core.wal import agent_client

    segment, agents_dir = fake_cluster
    agents_dir.chmod(0o755)
    thread = _fake_agent(
        agent_client.agent_stem(str(segment.parent), "ctx") + ".sock", b'{"ok": true}\n', threading.Event()
    )
    got, why = agent_client.push_through_agent(str(segment), "/etc/dr.yaml", None, "ctx")
    assert got == "unusable" and why and "not a private directory" in why
    assert not agent_client.start_agent(str(segment), "/etc/dr.yaml", None, "ctx")  # and none is started there
    thread.server.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
    thread.join(5)


def test_a_hung_agent_is_left_behind(fake_cluster, monkeypatch):
    """No answer in time: the call pushes by itself, and the socket is removed so that later calls
    do not wait on the same agent."""
    from dr_pipelines.core.wal import agent_client

    segment, _ = fake_cluster
    monkeypatch.setattr(agent_client, "ANSWER_TIMEOUT_S", 0.5)
    sock = agent_client.agent_stem(str(segment.parent), "ctx") + ".sock"
    hold = threading.Event()
    thread = _fake_agent(sock, b'{"ok": true}\n', hold)
    got, why = agent_client.push_through_agent(str(segment), "/etc/dr.yaml", None, "ctx")
    hold.set()
    thread.join(5)
    assert got == "failed" and why and "did not answer" in why
    assert not os.path.exists(sock)


# --------------------------------------------------------------------------- the compiled client
# dr-pipelines-wal (dr_pipelines/native/wal_client.c, built by ./dev setup) is what PostgreSQL runs
# (pg_config.wal_command); the tests above reach it through archive_command and restore_command.
# Here: the same agent and fast paths as the command's, and every other case handed to the command.


def run_wal_client(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(WAL_CLIENT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_postgres_runs_the_compiled_client(tmp_path, monkeypatch):
    """archive_command and restore_command name the compiled client when it was built for this
    installation, and the command itself when it is absent or was built for another checkout
    (it would never find this installation's agents)."""
    from dr_pipelines.core.wal import pg_config

    assert WAL_CLIENT.exists(), "./dev setup builds dr-pipelines-wal"
    assert pg_config.wal_command("/etc/dr.yaml") == [str(WAL_CLIENT), "--config", "/etc/dr.yaml"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert pg_config.wal_command(None) == [str(bin_dir / "dr-pipelines")]  # none built here
    stale = bin_dir / "dr-pipelines-wal"
    stale.write_text("#!/bin/sh\necho /elsewhere/dr_pipelines/core\n")
    stale.chmod(0o755)
    assert pg_config.wal_command(None) == [str(bin_dir / "dr-pipelines")]


def test_the_compiled_client_serves_what_the_command_serves(wal_setup, agents, tmp_path):
    """Through dr-pipelines-wal, with relative paths and a config path holding a space and a quote:
    the first call finds no agent, so the command pushes and starts one; the next calls reach that
    agent (the same socket as the command computes); a segment archived ahead takes the marker's
    fast path; different bytes are refused, the agent asked once; recovery's fetches come through
    the agent and then from its spool, byte for byte; "not found" is exit 1 without a warning."""
    wal_setup.enable_archiving()
    names = switch(wal_setup, 5)
    source = wal_setup.server.cluster.data_dir
    data = tmp_path / "data"
    pg_wal = data / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    (data / "global").mkdir()
    shutil.copy(source / "global" / "pg_control", data / "global" / "pg_control")
    (data / "postmaster.pid").write_text("4242\n")
    agents.append(pg_wal)
    raw = yaml.safe_load(wal_setup.config_path.read_text())
    raw["locations"] = {"local": {"type": "local", "path": str(tmp_path / "repo")}}
    (tmp_path / "dr conf").mkdir()
    config_path = tmp_path / "dr conf" / "it's.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    stem = stem_of(data, config_path)
    for name in names:
        shutil.copy(source / "pg_wal" / name, pg_wal / name)

    def push(name: str) -> subprocess.CompletedProcess:
        return run_wal_client(
            "--config", "dr conf/it's.yaml", "wal-push", "--db", "app", f"data/pg_wal/{name}", cwd=tmp_path
        )

    r = push(names[0])  # no agent: the command pushes it, and starts one
    assert r.returncode == 0 and r.stderr == "", r.stderr
    agent = wait_for_agent(stem)
    r = push(names[1])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert wait_for_agent(stem)["served"] == 1

    ctx = push_context(str(config_path), "app")
    mark_pushed(pg_wal / names[2], ctx)  # archived ahead: the agent is not asked
    assert push(names[2]).returncode == 0
    assert not (pg_wal / ".dr_pipelines_pushed" / names[2]).exists() and status(stem)["served"] == 1
    mark_pushed(pg_wal / names[3], push_context(str(tmp_path / "other.yaml"), "app"))  # another config's marker
    assert push(names[3]).returncode == 0
    assert not (pg_wal / ".dr_pipelines_pushed" / names[3]).exists() and status(stem)["served"] == 2
    assert not list((tmp_path / "repo").rglob(f"{names[2]}*"))  # the marker was trusted: nothing pushed

    changed = bytearray((pg_wal / names[1]).read_bytes())
    changed[5000] ^= 0xFF
    (pg_wal / names[1]).write_bytes(bytes(changed))
    r = push(names[1])  # the agent says no; the command, pushing by itself without asking again, says no too
    assert r.returncode == 1
    assert "warning: the archiver agent failed" in r.stderr and "different content" in r.stderr
    st = status(stem)
    assert st["failed"] == 1 and st["served"] == 2 and st["pid"] == agent["pid"]
    assert push(names[4]).returncode == 0

    # recovery: through the agent, then from its spool
    (data / "recovery.signal").touch()

    def fetch(name: str, *options: str) -> subprocess.CompletedProcess:
        dest = "data/pg_wal/RECOVERYXLOG"
        r = run_wal_client(
            "--config", "dr conf/it's.yaml", "wal-fetch", "--db", "app", *options, name, dest, cwd=tmp_path
        )
        if r.returncode == 0:
            assert (tmp_path / dest).read_bytes() == (source / "pg_wal" / name).read_bytes(), name
            (tmp_path / dest).unlink()
        return r

    r = fetch(names[0], "--location", "local")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert status(stem)["fetched"] == 1
    spool = pg_wal / ".dr_pipelines_prefetch"
    wait_for(lambda: (spool / names[1]).exists(), "the agent spools the next segment")
    assert fetch(names[1]).returncode == 0 and status(stem)["fetched"] == 1  # a rename: the agent not asked
    r = fetch("0000000100000000000000F0")
    assert r.returncode == 1 and "not in the WAL archive" in r.stderr and "warning" not in r.stderr
    r = fetch("0000000100000000000000F1", "--location", "nowhere")  # the agent refuses; the command says why
    assert r.returncode != 0 and "no location named nowhere" in r.stderr
    assert status(stem)["pid"] == agent["pid"]
    (data / "postmaster.pid").unlink()  # "the cluster stopped": the agent goes
    wait_for(lambda: gone(agent["pid"]), "the agent exits", 15)


@pytest.mark.parametrize(
    "answer, said",
    [
        (b"ok\n", None),
        (b"error s3: down\n", "warning: the archiver agent failed: s3: down"),
        (b"okay\n", "warning: the archiver agent answered okay"),
        (b'{"ok": true}\n', "warning: the archiver agent answered"),
        (b"ok\0 error\n", "warning: the archiver agent's answer holds a NUL byte"),
        (None, "warning: the archiver agent did not answer"),  # died mid-request
    ],
)
def test_the_compiled_client_believes_only_ok(tmp_path, answer, said):
    """Anything but "ok" goes to the command, which pushes by itself (here it stops at the config,
    which names no database), saying what the agent did."""
    from dr_pipelines.core.wal.agent_client import ensure_agent_dir

    data = Path(tempfile.mkdtemp(prefix="drw-", dir="/tmp"))  # short: a socket path has 108 bytes
    try:
        (data / "pg_wal").mkdir()
        (data / "postmaster.pid").write_text("12345\n")
        (data / "pg_wal" / "000000010000000000000001").write_bytes(b"\0" * 1024)
        config_path = tmp_path / "dr.yaml"
        config_path.write_text(yaml.safe_dump({"locations": {"local": {"type": "local", "path": str(tmp_path / "r")}}}))
        assert ensure_agent_dir()
        sock = agent_stem(str(data / "pg_wal"), push_context(str(config_path), None)) + ".sock"
        released = threading.Event()
        released.set()
        thread = _fake_agent(sock, answer, released)
        r = run_wal_client("--config", str(config_path), "wal-push", "pg_wal/000000010000000000000001", cwd=data)
        thread.join(5)
        if said is None:
            assert r.returncode == 0 and r.stderr == ""
        else:
            assert r.returncode != 0 and said in r.stderr, r.stderr
            assert not list((tmp_path / "r").rglob("*0001*"))
    finally:
        shutil.rmtree(data, ignore_errors=True)
        Path(sock).unlink(missing_ok=True)


def test_the_command_takes_only_a_failure_from_the_compiled_client(monkeypatch):
    """What dr-pipelines-wal passes in the environment can make the command push by itself, never
    make it report a segment archived."""
    from dr_pipelines.cli.main import compiled_client_said

    monkeypatch.setenv("DR_PIPELINES_AGENT", "durable\tyes")
    assert compiled_client_said() is None and "DR_PIPELINES_AGENT" not in os.environ
    monkeypatch.setenv("DR_PIPELINES_AGENT", "failed\tthe archiver agent failed: s3: down")
    assert compiled_client_said() == ("failed", "the archiver agent failed: s3: down")
    assert "DR_PIPELINES_AGENT" not in os.environ


@pytest.mark.parametrize("staged", ["/tmp/{name}", "{spool}/{name}", "{spool}/.000000010000000000000009.fetched-1"])
def test_the_compiled_client_takes_only_a_file_of_its_spool(tmp_path, staged):
    """A fetch answered "ok" with a file outside the spool, or not named for this request, is not
    put where PostgreSQL reads: the command fetches by itself (here it stops at the config)."""
    from dr_pipelines.core.wal.agent_client import ensure_agent_dir

    name = "000000010000000000000001"
    data = Path(tempfile.mkdtemp(prefix="drw-", dir="/tmp"))
    spool = data / "pg_wal" / ".dr_pipelines_prefetch"
    spool.mkdir(parents=True)
    (data / "postmaster.pid").write_text("12345\n")
    config_path = tmp_path / "dr.yaml"
    config_path.write_text(yaml.safe_dump({"locations": {"local": {"type": "local", "path": str(tmp_path / "r")}}}))
    offered = Path(staged.format(name=f"offered-{data.name}", spool=spool))
    offered.write_bytes(b"not what the archive holds")
    assert ensure_agent_dir()
    sock = agent_stem(str(data / "pg_wal"), push_context(str(config_path), None)) + ".sock"
    released = threading.Event()
    released.set()
    try:
        thread = _fake_agent(sock, f"ok {offered}\n".encode(), released)
        r = run_wal_client("--config", str(config_path), "wal-fetch", name, "pg_wal/RECOVERYXLOG", cwd=data)
        thread.join(5)
        assert r.returncode != 0 and "warning: the archiver agent answered" in r.stderr, r.stderr
        assert offered.exists() and not (data / "pg_wal" / "RECOVERYXLOG").exists()
    finally:
        offered.unlink(missing_ok=True)
        shutil.rmtree(data, ignore_errors=True)
        Path(sock).unlink(missing_ok=True)


def test_the_compiled_client_hands_oversized_arguments_to_the_command(tmp_path):
    """A destination longer than a path, or locations too long for one request, are not cut short
    (a request cut short could ask the agent about another file, or fewer locations): the command
    gets them, and says what is wrong."""
    long_dest = "a" * 5000
    r = run_wal_client("wal-fetch", "000000010000000000000001", long_dest, cwd=tmp_path)
    assert r.returncode > 0 and "dr-pipelines" in r.stderr, r.stderr  # the command's own error, no crash
    data = tmp_path / "data"
    (data / "pg_wal").mkdir(parents=True)
    (data / "postmaster.pid").write_text("12345\n")
    config_path = tmp_path / "dr.yaml"
    config_path.write_text("locations: {}\n")
    locations = [a for _ in range(4) for a in ("--location", "\x01" * 3000)]
    r = run_wal_client("--config", str(config_path), "wal-fetch", *locations, "000000010000000000000001",
                       "pg_wal/RECOVERYXLOG", cwd=data)  # fmt: skip
    assert r.returncode > 0 and "dr-pipelines: error" in r.stderr, r.stderr
