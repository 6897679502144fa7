"""Is the resident archiver's memory flat under sustained load? (issue 14)

A fresh cluster archives every segment through `dr-pipelines wal-push` (and so through its agent)
while pgbench writes at a fixed rate for `--minutes`; every `--every` seconds the resident set (RSS)
of the agent, and of `dr-pipelines wal-stream` with its pg_receivewal when `--stream` is given, is
read from /proc. Reported: RSS after the warm-up, the peak, at the end, and the slope of a
least-squares line through the samples after the warm-up (MB per hour): flat means the slope is
within noise (a few MB/h) and the peak stays near the warm-up figure.

    .venv/bin/python bench/agent_memory.py --minutes 60          # the issue's hour
    .venv/bin/python bench/agent_memory.py --minutes 10 --stream  # shorter, with streaming
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, free_port
from dr_pipelines.core.wal.pg_config import postgresql_conf_lines

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
RESULTS = Path(__file__).resolve().parent / "results"
WARM_UP_S = 60.0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


PROCESSES = {  # what each reported process's command line holds
    "agent": "dr_pipelines.core.wal.agent",
    "wal-stream": "wal-stream bench",
    "pg_receivewal": "pg_receivewal",
}


def pids_running(work: Path) -> dict[str, list[int]]:
    """The live processes of this run (their command line names its directory), by PROCESSES' names."""
    found: dict[str, list[int]] = {n: [] for n in PROCESSES}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name, needle in PROCESSES.items():
            if needle in argv and str(work) in argv and "runuser" not in argv:
                found[name].append(int(entry))
    return found


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return 0.0
    ts, ms = [t for t, _ in samples], [m for _, m in samples]
    mt, mm = statistics.fmean(ts), statistics.fmean(ms)
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (m - mm) for t, m in samples) / var * 3600


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--every", type=float, default=5, help="seconds between samples")
    p.add_argument("--rate", type=int, default=400, help="pgbench transactions per second")
    p.add_argument("--stream", action="store_true", help="also run `dr-pipelines wal-stream` (streaming on)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="drbench-mem-", dir="/var/tmp"))
    work.chmod(0o755)
    chown_to_postgres(work)
    port = free_port()
    cluster = LocalCluster(work / "data", port)
    stream = None
    load = None
    try:
        repo = work / "repo"
        repo.mkdir()
        chown_to_postgres(repo)
        ident = pyrage.x25519.Identity.generate()
        identity = work / "identity.txt"
        identity.write_text(f"{ident}\n")
        identity.chmod(0o600)
        chown_to_postgres(identity)
        db: dict = {
            "host": "127.0.0.1",
            "port": port,
            "user": "postgres",
            "dbname": "bench",
            "objectives": {"rpo": "1m"},
        }
        if args.stream:
            db["streaming"] = {"enabled": True, "spool_dir": str(work / "stream")}  # named in its command lines
        config = work / "dr.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "databases": {"bench": db},
                    "locations": {"local": {"type": "local", "path": str(repo)}},
                    "encryption": {
                        "method": "age",
                        "recipients": [str(ident.to_public())],
                        "identity_file": str(identity),
                    },
                }
            )
        )
        config.chmod(0o644)
        from dr_pipelines.core.config import load_config

        lines = [
            ln for ln in postgresql_conf_lines(load_config(config), "bench", str(config)) if not ln.startswith("#")
        ]
        settings = dict(ln.split(" = ", 1) for ln in lines)
        cluster.initdb({**settings, "max_wal_size": "'1GB'", "max_wal_senders": "5"})
        cluster.start()
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE bench")
        pgbench = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        subprocess.run(pgbench + ["-i", "-q", "-s", "10", "bench"], check=True, capture_output=True)
        if args.stream:
            stream = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(VENV_BIN / "dr-pipelines"), "--config", str(config)]
                + ["wal-stream", "bench"],
                stdout=subprocess.DEVNULL,
                stderr=open(work / "wal-stream.log", "wb"),  # noqa: SIM115
            )
        seconds = int(args.minutes * 60)
        load = subprocess.Popen(
            pgbench + ["-n", "-c", "4", "-j", "2", "-R", str(args.rate), "-T", str(seconds), "bench"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        t0 = time.monotonic()
        samples: dict[str, list[tuple[float, float]]] = {"agent": [], "wal-stream": [], "pg_receivewal": []}
        agents_seen: set[int] = set()
        while load.poll() is None:
            time.sleep(args.every)
            now = time.monotonic() - t0
            for name, pids in pids_running(work).items():
                if pids:
                    samples[name].append((now, sum(m for m in (rss_mb(pid) for pid in pids) if m is not None)))
            agents_seen |= set(pids_running(work)["agent"])
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="bench") as c:
            row = c.execute(
                "SELECT archived_count, failed_count, pg_current_wal_lsn() - '0/0' FROM pg_stat_archiver"
            ).fetchone()
            assert row is not None
            archived, failed, wal_bytes = row
        result: dict = {
            "benchmark": "agent_memory",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "minutes": args.minutes,
            "rate_tps": args.rate,
            "wal_written_mb": round(int(wal_bytes) / 1e6),
            "segments_archived": archived,
            "archive_failures": failed,
            "agent_pids": sorted(agents_seen),
            "processes": {},
        }
        for name, series in samples.items():
            warm = [(t, m) for t, m in series if t >= WARM_UP_S] or series
            if not warm:
                continue
            result["processes"][name] = {
                "after_warm_up_mb": round(warm[0][1], 1),
                "peak_mb": round(max(m for _, m in warm), 1),
                "end_mb": round(warm[-1][1], 1),
                "slope_mb_per_hour": round(slope_mb_per_hour(warm), 2),
                "samples": len(series),
            }
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"agent-memory-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.write_text(json.dumps({**result, "series": samples}, indent=1))
        print(json.dumps(result, indent=2))
        print(f"results: {out}")
        if len(agents_seen) != 1:
            print(f"note: {len(agents_seen)} agents served the run (one is expected: a restart shows here)")
        return 0
    finally:
        for proc in (load, stream):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        cluster.stop("fast")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
