"""Physical benchmarks (issue 4), on the same cluster and data, in the same run, as ratios:

- base backup: `dr-pipelines backup --kind base` (pg_basebackup tar -> zstd -3 -> age -> SHA-256 -> local)
  vs `pg_basebackup -Ft --compress=client-zstd` (budget <= 1.20x) and vs `pgbackrest backup --type=full`
  (posix repo, zst level 3, process-max 2, aes-256-cbc: target faster);
- wal-push per 16 MB segment vs `pgbackrest archive-push` (both as the postgres user, as archive_command):
  our command alone (no agent: the segment is not in a running cluster's pg_wal), handed to a warm
  resident agent, and a segment an earlier call archived ahead;
- PITR to a time during load: `dr-pipelines pitr` (Dagster job, into a new directory, until promoted) vs
  `pgbackrest restore --type=time` + start + promotion;
- archive backlog while pgbench runs flat out with our archive_command: the most .ready segments seen.

The archive_command pushes every segment to both our repository and pgBackRest's during the run, so
each tool restores from its own archive.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, run_as_postgres

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = run_as_postgres(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


class Setup:
    def __init__(self, cluster: LocalCluster, port: int, work: Path, ours_bin: Path, env: dict):
        self.cluster, self.port, self.work, self.ours_bin, self.env = cluster, port, work, ours_bin, env
        work.chmod(0o755)
        chown_to_postgres(work)
        self.sock = work / "sock"
        self.pgbr_repo = work / "pgbr-repo"
        for d in (self.sock, self.pgbr_repo, work / "pgbr-log", work / "pgbr-lock", work / "repo" / "bench" / "wal"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (
            work / "repo",
            work / "repo" / "bench",
            work / "repo" / "bench" / "wal",
            self.sock,
            self.pgbr_repo,
            work / "pgbr-log",
            work / "pgbr-lock",
        ):
            chown_to_postgres(d)
        self.pgbr_conf = work / "pgbackrest.conf"
        self.pgbr_conf.write_text(
            "[global]\n"
            f"repo1-path={self.pgbr_repo}\nrepo1-retention-full=1\ncompress-type=zst\ncompress-level=3\n"
            "process-max=2\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench-only-passphrase\n"
            f"log-path={work / 'pgbr-log'}\nlock-path={work / 'pgbr-lock'}\nlog-level-console=warn\nstart-fast=y\n"
            f"[bench]\npg1-path={cluster.data_dir}\npg1-port={port}\npg1-socket-path={self.sock}\n"
        )
        self.pgbr_conf.chmod(0o644)
        self.pgbr = ["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench"]
        identity = work / "identity.txt"
        chown_to_postgres(identity)
        self.config = work / "bench.yaml"
        self.config.chmod(0o644)
        raw = yaml.safe_load(self.config.read_text())
        raw["databases"]["bench"]["objectives"] = {"rpo": "5m"}
        self.config.write_text(yaml.safe_dump(raw))
        self.ours = [str(ours_bin), "--config", str(self.config)]

    def archive_command(self, both: bool = True) -> str:
        ours = " ".join(self.ours + ["wal-push", "--db", "bench", "%p"])
        return ours + (" && " + " ".join(self.pgbr + ["archive-push", "%p"]) if both else "")

    def enable(self) -> None:
        self.cluster.write_settings(
            {
                "archive_mode": "on",
                "wal_level": "replica",
                "archive_command": "'" + self.archive_command().replace("'", "''") + "'",
                "unix_socket_directories": f"'{self.sock}'",
            }
        )
        self.cluster.stop("fast")
        self.cluster.start()
        _as_postgres(self.pgbr + ["stanza-create"])

    def disable(self) -> None:
        """The cached benchmark cluster goes back to how the logical benchmarks expect it."""
        self.cluster.write_settings({"archive_mode": "off", "archive_command": "''", "unix_socket_directories": "''"})
        self.cluster.stop("fast")

    def connect(self, port: int | None = None) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=port or self.port, user="postgres", dbname="bench", autocommit=True
        )

    def switch_and_wait(self, timeout: float = 300) -> None:
        with self.connect() as c:
            seg = c.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + timeout
            while (c.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < seg:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{seg} not archived in {timeout}s")
                time.sleep(0.2)


def bench_base_backup(s: Setup, rounds: int) -> dict:
    bare_dir = s.work / "bare-base"
    bare = [
        str(PG_BIN / "pg_basebackup"),
        "-h",
        "127.0.0.1",
        "-p",
        str(s.port),
        "-U",
        "postgres",
        "-D",
        str(bare_dir),
        "-Ft",
        "-X",
        "none",
        "--compress=client-zstd",
        "--checkpoint=fast",
    ]
    ours = s.ours + ["backup", "bench", "--kind", "base"]
    times: dict[str, list[float]] = {"bare": [], "ours": [], "pgbackrest": []}
    order = ["bare", "ours", "pgbackrest"]
    for i in range(rounds):
        for name in order[i % 3 :] + order[: i % 3]:
            if name == "bare":
                shutil.rmtree(bare_dir, ignore_errors=True)
                times["bare"].append(_timed(bare, s.env))
                shutil.rmtree(bare_dir, ignore_errors=True)
            elif name == "ours":
                times["ours"].append(_timed(ours, s.env))
                for old in sorted((s.work / "repo" / "bench" / "base").iterdir())[:-1]:
                    shutil.rmtree(old)  # keep the newest only (the PITR benchmark uses it)
            else:
                times["pgbackrest"].append(_as_postgres(s.pgbr + ["backup", "--type=full"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "base_backup",
        **{f"{k}_s": v for k, v in times.items()},
        **{f"{k}_median_s": v for k, v in med.items()},
        "ratio_vs_pg_basebackup": med["ours"] / med["bare"],
        "ratio_vs_pgbackrest": med["ours"] / med["pgbackrest"],
    }


def _agent_data_dir(s: Setup) -> Path:
    """A data directory of our own holding pg_wal, pg_control and postmaster.pid, so `wal-push` sees
    a running cluster's pg_wal and hands its segments to the resident agent (the bench cluster's own
    pg_wal is left alone)."""
    data = s.work / "agent-data"
    (data / "global").mkdir(parents=True, exist_ok=True)
    (data / "pg_wal").mkdir(exist_ok=True)
    shutil.copy(s.cluster.data_dir / "global" / "pg_control", data / "global" / "pg_control")
    shutil.copy(s.cluster.data_dir / "postmaster.pid", data / "postmaster.pid")
    for p in (data, data / "global", data / "pg_wal", data / "global" / "pg_control", data / "postmaster.pid"):
        chown_to_postgres(p)
    return data


def bench_wal_push(s: Setup, count: int) -> dict:
    with s.connect() as c:
        name = c.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    src = s.cluster.data_dir / "pg_wal" / name
    seg_dir = s.work / "segments"
    seg_dir.mkdir(exist_ok=True)
    chown_to_postgres(seg_dir)
    from dr_pipelines.core.wal.agent_client import NotListening, agent_stem, request
    from dr_pipelines.core.wal.fast_path import mark_pushed, push_context

    agent_data = _agent_data_dir(s)
    stem = agent_stem(str(agent_data / "pg_wal"), push_context(str(s.config), "bench"), agent_data.stat().st_uid)

    def fake_segment(directory: Path, offset: int) -> Path:
        fake = directory / f"00000001000000FF{offset:08X}"  # names no cluster will use
        shutil.copy(src, fake)
        chown_to_postgres(fake)
        return fake

    # the agent's first call: no agent yet, so it pushes by itself and starts one
    first = fake_segment(agent_data / "pg_wal", 0x30)
    agent_first_s = _as_postgres(s.ours + ["wal-push", "--db", "bench", str(first)])
    deadline = time.monotonic() + 60
    while True:
        try:
            request(stem + ".sock", {"status": True}, timeout=10)
            break
        except NotListening:
            if time.monotonic() > deadline:
                raise SystemExit(f"the archiver agent did not start; see {stem}.log") from None
            time.sleep(0.1)

    ours_s, ahead_s, agent_s, pgbr_s = [], [], [], []
    for i in range(count):
        for tool, out in (("ours", ours_s), ("ahead", ahead_s), ("agent", agent_s), ("pgbackrest", pgbr_s)):
            offset = {"ours": 0x10, "ahead": 0x20, "agent": 0x31, "pgbackrest": 0}[tool]
            fake = fake_segment(agent_data / "pg_wal" if tool == "agent" else seg_dir, offset + i)
            if tool == "ahead":  # what PostgreSQL's call costs for a segment an earlier call archived ahead
                mark_pushed(fake, push_context(str(s.config), "bench"))
                chown_to_postgres(fake.parent / ".dr_pipelines_pushed")
            cmd = (
                s.pgbr + ["archive-push", str(fake)]
                if tool == "pgbackrest"
                else s.ours + ["wal-push", "--db", "bench", str(fake)]
            )
            out.append(_as_postgres(cmd))
            fake.unlink()
    served = request(stem + ".sock", {"status": True}, timeout=10)["served"]
    (agent_data / "postmaster.pid").unlink()  # "the cluster stopped": the agent leaves
    if served < count:
        raise SystemExit(f"the agent served {served} of {count} pushes: the agent mode measured the wrong path")
    return {
        "benchmark": "wal_push",
        "ours_s": ours_s,
        "ours_archived_ahead_s": ahead_s,
        "ours_agent_s": agent_s,
        "ours_agent_first_call_s": agent_first_s,
        "pgbackrest_s": pgbr_s,
        "ours_median_s": statistics.median(ours_s),
        "ours_archived_ahead_median_s": statistics.median(ahead_s),
        "ours_agent_median_s": statistics.median(agent_s),
        "pgbackrest_median_s": statistics.median(pgbr_s),
        "ratio": statistics.median(ours_s) / statistics.median(pgbr_s),
        "archived_ahead_ratio": statistics.median(ahead_s) / statistics.median(pgbr_s),
        "agent_ratio": statistics.median(agent_s) / statistics.median(pgbr_s),
    }


def bench_pitr(s: Setup, free_port, rounds: int = 1) -> dict:
    """Both tools recover to the same moment; the order alternates each round (the first to write
    gigabytes of new files on this VM pays for fresh memory pages, the second reuses them)."""
    load = subprocess.Popen(
        [
            str(PG_BIN / "pgbench"),
            "-h",
            "127.0.0.1",
            "-p",
            str(s.port),
            "-U",
            "postgres",
            "-n",
            "-c",
            "4",
            "-T",
            "10",
            "bench",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(5)
    target = datetime.now(timezone.utc)
    load.wait()
    s.switch_and_wait()
    from dr_pipelines.core.repository.records import Record, RecordKind, load_reports
    from dr_pipelines.core.storage.local import LocalLocation

    def ours() -> tuple[float, Record]:
        data_dir, port = s.work / "pitr-ours" / "data", free_port()
        data_dir.parent.mkdir()
        chown_to_postgres(data_dir.parent)
        took = _timed(
            s.ours
            + ["pitr", "bench", "--target-time", target.isoformat(), "--data-dir", str(data_dir), "--port", str(port)],
            s.env,
        )
        LocalCluster(data_dir, port).stop("fast")
        shutil.rmtree(data_dir.parent)
        return took, load_reports({"local": LocalLocation("local", s.work / "repo")}, "bench", RecordKind.PITR)[0]

    def pgbackrest() -> float:
        data_dir, port = s.work / "pitr-pgbr" / "data", free_port()
        data_dir.parent.mkdir()
        chown_to_postgres(data_dir.parent)
        t0 = time.perf_counter()
        data_dir.mkdir(mode=0o700)
        chown_to_postgres(data_dir)
        _as_postgres(
            s.pgbr
            + [
                "restore",
                "--type=time",
                f"--target={target:%Y-%m-%d %H:%M:%S.%f}"[:-3] + "+00",
                "--target-action=promote",
                f"--pg1-path={data_dir}",
            ]
        )
        restored = LocalCluster(data_dir, port)
        restored.write_settings({"archive_mode": "off", "unix_socket_directories": "''", "port": str(port)})
        restored.start(timeout=600)
        while True:
            try:
                with s.connect(port) as c:
                    if not c.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        break
            except psycopg.OperationalError:
                pass
            time.sleep(0.2)
        took = time.perf_counter() - t0
        restored.stop("fast")
        shutil.rmtree(data_dir.parent)
        return took

    ours_s, rto_s, steps, pgbr_s = [], [], [], []
    for i in range(rounds):
        for tool in ("ours", "pgbackrest") if i % 2 == 0 else ("pgbackrest", "ours"):
            if tool == "ours":
                took, report = ours()
                ours_s.append(took)
                rto_s.append(report.rto_s)
                steps.append(report.model_extra["steps_s"])
            else:
                pgbr_s.append(pgbackrest())
    pgbr = statistics.median(pgbr_s)
    return {
        "benchmark": "pitr",
        "ours_s": ours_s,
        "pgbackrest_s": pgbr_s,
        "ours_median_s": statistics.median(ours_s),
        "pgbackrest_median_s": pgbr,
        "ratio": statistics.median(ours_s) / pgbr,
        "job_rto_s": rto_s,
        "job_rto_ratio": statistics.median(rto_s) / pgbr,
        "job_steps_s": steps,
    }


def bench_backlog(s: Setup, seconds: int = 30) -> dict:
    """pgbench flat out with our archive_command alone: the most segments waiting (.ready) at once."""
    with s.connect() as c:
        c.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(s.archive_command(both=False))))
        c.execute("SELECT pg_reload_conf()")
        wal0 = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    status = s.cluster.data_dir / "pg_wal" / "archive_status"
    load = subprocess.Popen(
        [
            str(PG_BIN / "pgbench"),
            "-h",
            "127.0.0.1",
            "-p",
            str(s.port),
            "-U",
            "postgres",
            "-n",
            "-c",
            "8",
            "-j",
            "4",
            "-T",
            str(seconds),
            "bench",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = []
    while load.poll() is None:
        samples.append(sum(1 for p in status.iterdir() if p.suffix == ".ready"))
        time.sleep(0.5)
    with s.connect() as c:
        wal_bytes = c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (wal0,)).fetchone()[0]
        c.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(s.archive_command())))
        c.execute("SELECT pg_reload_conf()")
    t0 = time.perf_counter()
    s.switch_and_wait()
    return {
        "benchmark": "archive_backlog",
        "seconds": seconds,
        "wal_mb": float(wal_bytes) / 1e6,
        "wal_mb_per_s": float(wal_bytes) / 1e6 / seconds,
        "max_ready": max(samples or [0]),
        "median_ready": statistics.median(samples or [0]),
        "drain_after_load_s": time.perf_counter() - t0,
    }
