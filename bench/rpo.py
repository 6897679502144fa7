"""Measured RPO (issue 14): pgbench commits numbered rows while the client logs every commit it was
told of; the primary is killed (its host is lost: the postmaster, every backend, the archiver and our
resident archiver agent, SIGKILL) and its data directory deleted; `dr-pipelines pitr --latest`
recovers from the repository alone; the committed transactions missing from the recovered database
are counted, as transactions and as seconds (from the last recovered commit to the last committed one).

    ./dev bench rpo                        # archive, stream and sync modes (stream/sync need wal-stream)
    .venv/bin/python bench/rpo.py --modes archive --archive-timeout 20

Modes and goals:
- archive: archive_command = our wal-push, with the settings `dr-pipelines pg-config` prints for an RPO
  of 2 min (archive_timeout 60 s, its floor; `--archive-timeout S` sets another, stated in the
  output). Goal: loss <= archive_timeout.
- stream: as archive, plus `dr-pipelines wal-stream DB` running (streaming: {enabled: true,
  partial_interval: 1s}); it pushes completed and partial segments. Goal: <= 1 s of transactions.
- sync: the same with `synchronous: true` (the streamer is a synchronous standby). Goal: 0.
When `dr-pipelines wal-stream --help` fails (the command is not there yet), stream and sync are
skipped, and the output says why.

The load is pgbench at a fixed rate (`--rate`, 200 tx/s by default: a segment never fills, so
archive_timeout, not segment size, bounds the archive mode's loss): each transaction inserts
(client_id, n) with n counting that client's transactions from 1, so a client's recovered rows are
1..m and its log says how many it committed. The kill comes 20 s plus a random part of archive_timeout
after the load starts, so the archive mode's loss is a sample of a value between 0 and
archive_timeout (one kill per mode; `--trials N` kills N fresh clusters per mode).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pyrage
import yaml
from psycopg import sql

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from peers import rewrite_section  # noqa: E402  (bench/peers.py)
from run import PG_BIN, RESULTS, VENV_BIN, clean_env  # noqa: E402  (bench/run.py)

from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, free_port  # noqa: E402

README = BENCH / "README.md"
DR = str(VENV_BIN / "dr-pipelines")
SCRIPT = "\\set n :n + 1\nINSERT INTO rpo_log (client, n) VALUES (:client_id, :n);\n"
GOALS = {"archive": "<= archive_timeout", "stream": "<= 1 s", "sync": "0"}


def wal_stream_available() -> tuple[bool, str, bool]:
    """(available, why not, whether `wal-stream` takes --config itself)."""
    proc = subprocess.run([DR, "wal-stream", "--help"], capture_output=True, text=True, env=clean_env())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1].split(" (choose from")[0]
        return False, f"`dr-pipelines wal-stream --help` failed: {last}", False
    return True, "", "--config" in proc.stdout


def write_config(work: Path, port: int, streaming: dict | None) -> Path:
    ident = pyrage.x25519.Identity.generate()
    identity = work / "identity.txt"
    identity.write_text(f"{ident}\n")
    identity.chmod(0o600)
    chown_to_postgres(identity)  # restore_command (wal-fetch) runs as postgres and decrypts
    repo = work / "repo"
    for d in (repo, repo / "bench", repo / "bench" / "wal"):
        d.mkdir(exist_ok=True)
        chown_to_postgres(d)
    db: dict = {"host": "127.0.0.1", "port": port, "user": "postgres", "dbname": "bench", "objectives": {"rpo": "2m"}}
    if streaming is not None:
        db["streaming"] = streaming
    config = work / "rpo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "databases": {"bench": db},
                "locations": {"local": {"type": "local", "path": str(repo)}},
                "encryption": {"method": "age", "recipients": [str(ident.to_public())], "identity_file": str(identity)},
                "compression": {"method": "zstd", "level": 3},
            }
        )
    )
    config.chmod(0o644)
    return config


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def pg_config_settings(config: Path) -> dict[str, str]:
    """The `name = value` lines `dr-pipelines pg-config` prints (values already quoted)."""
    out = _run([DR, "--config", str(config), "pg-config", "bench"]).stdout
    settings = {}
    for line in out.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            settings[name.strip()] = value.strip()
    return settings


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def agent_pid(pg_wal: Path, config: Path) -> int | None:
    """Our resident archiver of this cluster, if one runs (it lives on the primary's host)."""
    from dr_pipelines.core.wal.agent_client import NotListening, agent_stem, request
    from dr_pipelines.core.wal.fast_path import push_context

    stem = agent_stem(str(pg_wal), push_context(str(config), "bench"), pg_wal.stat().st_uid)
    try:
        return int(request(stem + ".sock", {"status": True}, timeout=5)["pid"])
    except (NotListening, OSError, ValueError, KeyError):
        return None


def lose_host(cluster: LocalCluster, config: Path) -> float:
    """SIGKILL the postmaster, everything under it and our agent, then delete the data directory.
    Returns the time of the kill (epoch seconds)."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    victims = [pid for pid in [agent_pid(cluster.data_dir / "pg_wal", config)] if pid]
    victims = [postmaster, *_descendants(postmaster), *victims]
    killed_at = time.time()
    for pid in victims:  # all of them started by this benchmark (the cluster, its children, our agent)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in _descendants(postmaster):  # a child forked between the listing and the kill
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(cluster.data_dir)
    return killed_at


def read_client_log(work: Path) -> dict[int, list[float]]:
    """client -> completion times of its committed transactions, in order (pgbench -l: client_id,
    transaction_no, latency, script_no, time_epoch, time_us[, schedule_lag])."""
    commits: dict[int, dict[int, float]] = {}
    for log in work.glob("rpo_client.*"):
        for line in log.read_text().splitlines():
            f = line.split()
            if len(f) < 6 or not f[2].isdigit():
                continue  # "failed" or "skipped": not committed
            commits.setdefault(int(f[0]), {})[int(f[1])] = int(f[4]) + int(f[5]) / 1e6
    return {c: [t[k] for k in sorted(t)] for c, t in commits.items()}


def count_loss(committed: dict[int, list[float]], recovered: dict[int, tuple[int, int]]) -> dict:
    """`recovered`: client -> (max n, row count). A client's k-th commit is row n = k."""
    lost, in_doubt, gaps = 0, 0, []
    last_recovered_t, lost_times = 0.0, []
    for client, times in committed.items():
        top, rows = recovered.get(client, (0, 0))
        if rows != top:
            gaps.append(client)
        lost += max(0, len(times) - top)
        in_doubt += max(0, top - len(times))  # committed on the server, the ack never reached the client
        if top:
            last_recovered_t = max(last_recovered_t, times[min(top, len(times)) - 1])
        lost_times += times[top:]
    last_commit_t = max(t for times in committed.values() for t in times)
    if not last_recovered_t:  # none of the load's commits came back: all of it is lost
        last_recovered_t = min(t for times in committed.values() for t in times)
    return {
        "committed": sum(len(t) for t in committed.values()),
        "recovered": sum(top for top, _ in recovered.values()),
        "lost_tx": lost,
        "lost_s": (last_commit_t - last_recovered_t) if lost else 0.0,
        "lost_since_first_lost_s": (last_commit_t - min(lost_times)) if lost_times else 0.0,
        "recovered_in_doubt_tx": in_doubt,
        "clients_with_gaps": gaps,
        "last_commit_epoch": last_commit_t,
    }


def run_mode(mode: str, args, work: Path, stream_takes_config: bool) -> dict:
    work.chmod(0o755)
    chown_to_postgres(work)
    port = free_port()
    streaming = None
    if mode != "archive":
        # the spool in the trial's directory: a default one would hand the next trial (a new cluster)
        # the last one's WAL
        streaming = {
            "enabled": True,
            "partial_interval": "1s",
            "synchronous": mode == "sync",
            "spool_dir": str(work / "stream"),
        }
    config = write_config(work, port, streaming)
    settings = pg_config_settings(config)
    notes = []
    if args.archive_timeout:
        settings["archive_timeout"] = f"{args.archive_timeout}s"
        notes.append(f"archive_timeout {args.archive_timeout}s (--archive-timeout; pg-config's is longer)")
    # set once the streamer is connected: before that, every commit (the setup's too) would wait for it
    sync_names = settings.pop("synchronous_standby_names", None)
    if mode == "sync" and sync_names is None:
        sync_names = "'*'"
        notes.append("synchronous_standby_names = '*' set by the benchmark (pg-config printed none)")
    cluster = LocalCluster(work / "primary", port)
    cluster.initdb(settings)
    streamer = None
    recovered_cluster = None
    try:
        cluster.start()
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE bench")
            archive_timeout = c.execute("SHOW archive_timeout").fetchone()[0]
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="bench", autocommit=True) as c:
            c.execute("CREATE TABLE rpo_log (client int, n int, at timestamptz DEFAULT clock_timestamp(), PRIMARY KEY (client, n))")  # fmt: skip
        _run([DR, "--config", str(config), "backup", "bench", "--kind", "base"])
        if streaming is not None:
            from dr_pipelines_tests.support.processes import stop_process

            cmd = [DR, "wal-stream", "bench", "--config", str(config)]
            if not stream_takes_config:
                cmd = [DR, "--config", str(config), "wal-stream", "bench"]
            streamer = subprocess.Popen(
                cmd,
                stdout=open(work / "wal-stream.log", "w"),  # noqa: SIM115  (the child owns it)
                stderr=subprocess.STDOUT,
                env=clean_env(),
                start_new_session=True,
            )
            wait_streaming(port, False, streamer, work / "wal-stream.log")
            if sync_names is not None:
                with psycopg.connect(host="127.0.0.1", port=port, user="postgres", autocommit=True) as c:
                    names = sync_names.strip("'").replace("''", "'")
                    c.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(names)))
                    c.execute("SELECT pg_reload_conf()")
                wait_streaming(port, mode == "sync", streamer, work / "wal-stream.log")
        script = work / "rpo.sql"
        script.write_text(SCRIPT)
        # the kill lands at a random moment of archive_timeout's cycle (a fixed load time would kill at
        # the same phase every time): the archive mode's loss is then a fair sample of 0..archive_timeout
        load_s = args.load_seconds or round(20 + random.uniform(0, _seconds(archive_timeout)), 1)
        load = subprocess.Popen(
            [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", "-f", str(script),
             "-c", "4", "-j", "2", "-R", str(args.rate), "-T", str(int(load_s) + 120), "-D", "n=0", "-l",
             f"--log-prefix={work / 'rpo_client'}", "bench"],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(load_s)
        if load.poll() is not None:
            raise SystemExit(f"pgbench ended before the kill: {load.stderr.read()[-2000:]}")
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as c:
            last_archived = c.execute("SELECT last_archived_time FROM pg_stat_archiver").fetchone()[0]
        killed_at = lose_host(cluster, config)
        load.wait(timeout=60)
        if streamer is not None:
            time.sleep(args.stream_grace)  # the streamer (on another host) pushes the partial it holds
            stop_process(streamer)
            streamer = None
        committed = read_client_log(work)
        t0 = time.perf_counter()
        recovered_cluster = LocalCluster(work / "recovered" / "data", free_port())
        (work / "recovered").mkdir()
        chown_to_postgres(work / "recovered")
        _run(
            [DR, "--config", str(config), "pitr", "bench", "--latest", "--data-dir", str(recovered_cluster.data_dir)]
            + ["--port", str(recovered_cluster.port)]
        )
        pitr_s = time.perf_counter() - t0
        with psycopg.connect(
            host="127.0.0.1", port=recovered_cluster.port, user="postgres", dbname="bench", autocommit=True
        ) as c:
            rows = c.execute("SELECT client, max(n), count(*) FROM rpo_log GROUP BY client").fetchall()
        loss = count_loss(committed, {client: (top, n) for client, top, n in rows})
        first = min(t for times in committed.values() for t in times)
        return {
            "benchmark": "rpo",
            "mode": mode,
            "archive_timeout": archive_timeout,
            "rate_tps": args.rate,
            "load_s": load_s,
            "achieved_tps": loss["committed"] / max(1e-9, loss["last_commit_epoch"] - first),
            "kill_after_last_commit_s": killed_at - loss["last_commit_epoch"],
            # what archiving alone would lose: the time since the newest segment reached the archive
            "kill_after_last_archived_s": killed_at - last_archived.timestamp() if last_archived else None,
            "pitr_command_s": pitr_s,
            "notes": notes,
            **loss,
        }
    finally:
        if streamer is not None:
            from dr_pipelines_tests.support.processes import stop_process

            stop_process(streamer)
        if recovered_cluster is not None:
            recovered_cluster.stop("immediate")
        if cluster.data_dir.exists():
            cluster.stop("immediate")


def _seconds(setting: str) -> int:
    """PostgreSQL's SHOW archive_timeout: '1min', '60s', '0'."""
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
    for unit in sorted(units, key=len, reverse=True):
        if setting.endswith(unit):
            return int(float(setting[: -len(unit)]) * units[unit])
    return int(setting)


def wait_streaming(port: int, sync: bool, streamer: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until a walsender streams (and, for sync, is the synchronous standby)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as c:
        while time.monotonic() < deadline:
            if streamer.poll() is not None:
                raise SystemExit(f"wal-stream exited ({streamer.returncode}):\n{log.read_text()[-2000:]}")
            states = c.execute("SELECT state, sync_state FROM pg_stat_replication").fetchall()
            if any(s == "streaming" and (not sync or ss == "sync") for s, ss in states):
                return
            time.sleep(0.2)
    raise SystemExit(
        f"wal-stream did not start streaming ({'sync' if sync else 'async'}) in {timeout}s; its log:\n"
        + log.read_text()[-2000:]
    )


def _fmt(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.1f} s"


def markdown(results: list[dict], skipped: dict[str, str], meta: dict) -> str:
    lines = [
        f"{meta['date']}: `{meta['command']}`; pgbench at {meta['rate']} tx/s (4 clients); one row per kill.",
        "",
        "| mode | archive_timeout | kill after the last archived segment | committed | lost (tx) | lost (s) | goal "
        "| met | in-doubt recovered | pitr --latest |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        limit = {"archive": _seconds(r["archive_timeout"]), "stream": 1.0, "sync": 0.0}[r["mode"]]
        met = r["lost_s"] <= limit and (r["mode"] != "sync" or r["lost_tx"] == 0) and not r["clients_with_gaps"]
        lines.append(
            f"| {r['mode']} | {r['archive_timeout']} | {_fmt(r['kill_after_last_archived_s'])} | {r['committed']} | "
            f"{r['lost_tx']} | {r['lost_s']:.2f} | "
            f"{GOALS[r['mode']]} | {'yes' if met else '**no**'} | {r['recovered_in_doubt_tx']} | {r['pitr_command_s']:.1f} s |"
        )
    for mode, why in skipped.items():
        lines.append(f"| {mode} | | | | | | {GOALS[mode]} | skipped: {why} | | |")
    notes = list(dict.fromkeys(n for r in results for n in r["notes"]))
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="archive,stream,sync")
    ap.add_argument("--rate", type=int, default=200, help="pgbench transactions per second (all clients)")
    ap.add_argument("--archive-timeout", type=int, default=0, help="seconds; default: what pg-config sets (60)")
    ap.add_argument(
        "--load-seconds",
        type=float,
        default=0,
        help="load before the kill (default: 20 s + a random part of archive_timeout)",
    )
    ap.add_argument("--stream-grace", type=float, default=5.0, help="seconds the streamer keeps running after the kill")
    ap.add_argument("--trials", type=int, default=1, help="kills per mode (each a fresh cluster)")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")
    started = datetime.now(timezone.utc)
    available, why, stream_takes_config = wal_stream_available()
    skipped = {m: why for m in modes if m != "archive" and not available}
    for mode, reason in skipped.items():
        print(f"{mode}: skipped: {reason}", flush=True)
    results = []
    for mode, trial in [(m, t) for m in modes if m not in skipped for t in range(1, args.trials + 1)]:
        work = Path(tempfile.mkdtemp(prefix=f"dr-bench-rpo-{mode}-", dir="/var/tmp"))
        try:
            r = {"trial": trial, **run_mode(mode, args, work, stream_takes_config)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(r)
        print(
            f"{mode} (trial {trial}): {r['committed']} commits acknowledged, {r['lost_tx']} lost ({r['lost_s']:.2f} s of commits; "
            f"archive_timeout {r['archive_timeout']}; killed {_fmt(r['kill_after_last_archived_s'])} after the last "
            f"segment was archived), {r['recovered_in_doubt_tx']} recovered whose ack never "
            f"arrived, gaps: {r['clients_with_gaps'] or 'none'}; pitr --latest {r['pitr_command_s']:.1f} s",
            flush=True,
        )
    meta = {
        "date": f"{started:%Y-%m-%d}",
        "rate": args.rate,
        "command": "./dev bench rpo" + " ".join([""] + sys.argv[1:]),
        "trials": args.trials,
        "median_lost_s": {
            m: statistics.median([r["lost_s"] for r in results if r["mode"] == m]) for m in {r["mode"] for r in results}
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"rpo-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"meta": meta, "skipped": skipped, "results": results}, indent=2))
    text = markdown(results, skipped, meta)
    print(text)
    print(f"results: {out}")
    if not args.no_readme:
        rewrite_section(README, "rpo", text)
        print(f"written: {README.relative_to(ROOT)} (between the rpo markers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
