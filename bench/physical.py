"""Physical benchmarks (issue 4), on the same cluster and data, in the same run, as ratios:

- base backup: `dr-pipelines backup --kind base` (pg_basebackup tar -> zstd -3 -> age -> SHA-256 -> local)
  vs `pg_basebackup -Ft --compress=client-zstd` (budget <= 1.20x) and vs `pgbackrest backup --type=full`
  (posix repo, zst level 3, process-max 2, aes-256-cbc: target faster);
- wal-push per 16 MB segment vs `pgbackrest archive-push` (both as the postgres user, as archive_command,
  ours through what PostgreSQL runs: the compiled client `dr-pipelines-wal` when built): our command
  alone (no agent: the segment is not in a running cluster's pg_wal), handed to a warm resident
  agent, and a segment an earlier call archived ahead;
- PITR to a time during load: `dr-pipelines pitr` (Dagster job, into a new directory, until promoted) vs
  `pgbackrest restore --type=time` + start + promotion;
- archive backlog while pgbench runs flat out with our archive_command: the most .ready segments seen.

The archive_command pushes every segment to both our repository and pgBackRest's during the run, so
each tool restores from its own archive. Given an S3 endpoint (`bench/peers.py`: moto over TLS on
127.0.0.1), it also pushes to our S3 location, to a pgBackRest S3 repository and, with barman-cloud
installed, to barman-cloud's archive on the same endpoint, and each benchmark adds those contenders.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

from dr_pipelines.core.child_env import server_env
from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres, run_as_postgres
from dr_pipelines.core.wal.pg_config import wal_command

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(cmd: list[str], env: dict | None = None) -> float:
    """`env`: default, none of our cloud variables (pgBackRest and a local repository need none)."""
    t0 = time.perf_counter()
    proc = run_as_postgres(cmd, capture_output=True, text=True, **({"env": env} if env is not None else {}))
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


@dataclass
class S3Endpoint:
    """One S3 endpoint every tool writes to, each under its own prefix: moto over TLS on 127.0.0.1
    (pgBackRest speaks S3 only over TLS), its self-signed certificate in `ca_file`."""

    url: str
    port: int
    bucket: str
    ca_file: Path

    def location(self, prefix: str) -> dict:
        """Our S3 location on this endpoint."""
        return {"type": "s3", "bucket": self.bucket, "prefix": prefix, "endpoint_url": self.url, "region": "us-east-1"}


def config_with_location(config: Path, location: dict, out: Path) -> Path:
    """A copy of our config whose only location is `location` (same database, key and codec)."""
    raw = yaml.safe_load(config.read_text())
    raw["locations"] = {location["type"]: location}
    out.write_text(yaml.safe_dump(raw))
    out.chmod(0o644)
    return out


def alternate(
    contenders: dict[str, Callable[[], float]], rounds: int, before: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Each contender once a round; the order rotates, so each goes first in turn (the first to write
    gigabytes of new files on this VM pays for fresh memory pages). `before` runs, untimed, before each."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if before is not None:
                before()
            times[name].append(contenders[name]())
    return times


def _medians(times: dict[str, list[float]]) -> dict:
    return {
        **{f"{k}_s": v for k, v in times.items()},
        **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
    }


_PGBR_COMMON = (
    "compress-type=zst\ncompress-level=3\nprocess-max=2\nrepo1-retention-full=1\n"
    "repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench-only-passphrase\n"
)


def _pgbr_s3_repo(repo: str, path: str, s3: S3Endpoint) -> str:
    """pgBackRest's options for repository `repo` (repo1, repo2) on the S3 endpoint."""
    return (
        f"{repo}-type=s3\n{repo}-path={path}\n{repo}-s3-bucket={s3.bucket}\n{repo}-s3-endpoint=127.0.0.1\n"
        f"{repo}-storage-port={s3.port}\n{repo}-s3-region=us-east-1\n{repo}-s3-uri-style=path\n"
        f"{repo}-s3-key=bench\n{repo}-s3-key-secret=bench\n{repo}-storage-ca-file={s3.ca_file}\n"
        # small files bundled into larger objects, as pgBackRest's user guide advises
        f"{repo}-bundle=y\n"
    )


class Setup:
    def __init__(
        self,
        cluster: LocalCluster,
        port: int,
        work: Path,
        ours_bin: Path,
        env: dict,
        s3: S3Endpoint | None = None,
        barman_bin: Path | None = None,
        gcs_bucket: str | None = None,
    ):
        self.cluster, self.port, self.work, self.ours_bin, self.env = cluster, port, work, ours_bin, env
        self.s3, self.barman_bin = s3, barman_bin if s3 is not None else None
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
        self.pgbr_conf = self._pgbr_conf("pgbackrest.conf", f"repo1-path={self.pgbr_repo}\n")
        self.pgbr = ["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench"]
        identity = work / "identity.txt"
        chown_to_postgres(identity)
        self.config = work / "bench.yaml"
        self.config.chmod(0o644)
        raw = yaml.safe_load(self.config.read_text())
        raw["databases"]["bench"]["objectives"] = {"rpo": "5m"}
        self.config.write_text(yaml.safe_dump(raw))
        self.ours = [str(ours_bin), "--config", str(self.config)]
        # what the cluster's archive_command gets (the S3 keys and CA bundle too): the commands timed
        # as the postgres user get the same
        self.pg_env = server_env()
        if s3 is not None:
            self.config_s3 = config_with_location(self.config, s3.location("physical/"), work / "bench-s3.yaml")
            self.ours_s3 = [str(ours_bin), "--config", str(self.config_s3)]
            self.pgbr_s3_conf = self._pgbr_conf("pgbackrest-s3.conf", _pgbr_s3_repo("repo1", "/pgbackrest", s3))
            self.pgbr_s3 = ["pgbackrest", f"--config={self.pgbr_s3_conf}", "--stanza=bench"]
            self.barman_url = f"s3://{s3.bucket}/barman"
        self.config_all: Path | None = None
        if s3 is not None and gcs_bucket is not None:
            # WAL pushed to every kind of location at once (local, S3, GCS), against pgBackRest
            # pushing to its two repositories (posix and S3) in one archive-push
            repo_all, pgbr_repo_multi = work / "repo-all", work / "pgbr-repo-multi"
            for d in (repo_all, repo_all / "bench", repo_all / "bench" / "wal", pgbr_repo_multi):
                d.mkdir(parents=True, exist_ok=True)
                chown_to_postgres(d)
            raw = yaml.safe_load(self.config.read_text())
            raw["locations"] = {
                "local": {"type": "local", "path": str(repo_all)},
                "s3": s3.location("walpush-all/"),
                "gcs": {"type": "gcs", "bucket": gcs_bucket, "prefix": "walpush-all/", "project": "bench"},
            }
            self.config_all = work / "bench-all.yaml"
            self.config_all.write_text(yaml.safe_dump(raw))
            self.config_all.chmod(0o644)
            self.pgbr_multi_conf = self._pgbr_conf(
                "pgbackrest-multi.conf",
                f"repo1-path={pgbr_repo_multi}\n"
                + _pgbr_s3_repo("repo2", "/pgbackrest-multi", s3)
                + "repo2-cipher-type=aes-256-cbc\nrepo2-cipher-pass=bench-only-passphrase\nrepo2-retention-full=1\n",
            )
            self.pgbr_multi = ["pgbackrest", f"--config={self.pgbr_multi_conf}", "--stanza=bench"]

    def _pgbr_conf(self, name: str, repo: str) -> Path:
        conf = self.work / name
        conf.write_text(
            f"[global]\n{repo}{_PGBR_COMMON}"
            f"log-path={self.work / 'pgbr-log'}\nlock-path={self.work / 'pgbr-lock'}\nlog-level-console=warn\nstart-fast=y\n"
            f"[bench]\npg1-path={self.cluster.data_dir}\npg1-port={self.port}\npg1-socket-path={self.sock}\n"
        )
        conf.chmod(0o644)
        return conf

    def barman(self, command: str, *args: str) -> list[str]:
        """A barman-cloud command against the S3 endpoint."""
        assert self.s3 is not None and self.barman_bin is not None
        return [str(self.barman_bin / command), "--endpoint-url", self.s3.url, *args]

    def archive_command(self, both: bool = True) -> str:
        """Ours alone, or every tool's push in turn (each restores from its own archive)."""
        ours = " ".join(wal_command(str(self.config)) + ["wal-push", "--db", "bench", "%p"])
        if not both:
            return ours
        pushes = [ours, " ".join(self.pgbr + ["archive-push", "%p"])]
        if self.s3 is not None:
            pushes.append(" ".join(wal_command(str(self.config_s3)) + ["wal-push", "--db", "bench", "%p"]))
            pushes.append(" ".join(self.pgbr_s3 + ["archive-push", "%p"]))
            if self.barman_bin is not None:
                pushes.append(
                    " ".join(self.barman("barman-cloud-wal-archive", "--zstd", self.barman_url, "bench", "%p"))
                )
        return " && ".join(pushes)

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
        if self.s3 is not None:
            _as_postgres(self.pgbr_s3 + ["stanza-create"])
        if self.config_all is not None:
            _as_postgres(self.pgbr_multi + ["stanza-create"])

    def disable(self) -> None:
        """The cached benchmark cluster goes back to how the logical benchmarks expect it."""
        self.cluster.write_settings({"archive_mode": "off", "archive_command": "''", "unix_socket_directories": "''"})
        self.cluster.stop("fast")

    def connect(self, port: int | None = None) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=port or self.port, user="postgres", dbname="bench", autocommit=True
        )

    def wait_archive_idle(self, timeout: float = 300) -> None:
        """Until no segment waits for the archive_command. A tool that waits only for its own copy
        (pgBackRest's archive-check) or for none (barman-cloud-backup) returns while the rest of the
        archive_command still runs; without this, that work would be timed in the next contender."""
        status = self.cluster.data_dir / "pg_wal" / "archive_status"
        deadline = time.monotonic() + timeout
        while any(p.suffix == ".ready" for p in status.iterdir()):
            if time.monotonic() > deadline:
                raise SystemExit(f"segments still waiting for the archive_command after {timeout}s")
            time.sleep(0.1)

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

    def pg_basebackup() -> float:
        shutil.rmtree(bare_dir, ignore_errors=True)
        took = _timed(bare, s.env)
        shutil.rmtree(bare_dir, ignore_errors=True)
        return took

    def ours() -> float:
        took = _timed(s.ours + ["backup", "bench", "--kind", "base"], s.env)
        for old in sorted((s.work / "repo" / "bench" / "base").iterdir())[:-1]:
            shutil.rmtree(old)  # keep the newest only (the PITR benchmark uses it)
        return took

    contenders: dict[str, Callable[[], float]] = {
        "bare": pg_basebackup,
        "ours": ours,
        "pgbackrest": lambda: _as_postgres(s.pgbr + ["backup", "--type=full"]),
    }
    if s.s3 is not None:
        contenders["ours_s3"] = lambda: _timed(s.ours_s3 + ["backup", "bench", "--kind", "base"], s.env)
        contenders["pgbackrest_s3"] = lambda: _as_postgres(s.pgbr_s3 + ["backup", "--type=full"])
        if s.barman_bin is not None:
            # lz4: the fastest of barman-cloud-backup's codecs (it has no zstd for base backups);
            # -J 2 upload processes, as pgBackRest's process-max=2
            contenders["barman_cloud"] = lambda: _as_postgres(
                s.barman("barman-cloud-backup", "--lz4", "--immediate-checkpoint", "-J", "2")
                + ["-h", "127.0.0.1", "-p", str(s.port), "-U", "postgres", s.barman_url, "bench"],
                s.pg_env,
            )
    times = alternate(contenders, rounds, before=s.wait_archive_idle)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "base_backup",
        **_medians(times),
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
    """One 16 MB segment per call, as the postgres user (as archive_command), `count` calls each, the
    order rotating: our command alone (not a running cluster's pg_wal: no agent), through the warm
    resident agent, the call for a segment an earlier call archived ahead; `pgbackrest archive-push`;
    with an S3 endpoint the same to S3, and `barman-cloud-wal-archive --zstd`; with a GCS endpoint too,
    ours to local + S3 + GCS at once against pgBackRest to its posix and S3 repositories at once."""
    if count > 15:
        raise SystemExit("at most 15 pushes per tool (the fake segment names hold 16 per tool)")
    with s.connect() as c:
        name = c.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    src = s.cluster.data_dir / "pg_wal" / name
    seg_dir = s.work / "segments"
    seg_dir.mkdir(exist_ok=True)
    chown_to_postgres(seg_dir)
    from dr_pipelines.core.wal.agent_client import NotListening, agent_stem, request
    from dr_pipelines.core.wal.fast_path import mark_pushed, push_context

    agent_data = _agent_data_dir(s)
    agent_wal = agent_data / "pg_wal"

    def fake_segment(directory: Path, offset: int) -> Path:
        fake = directory / f"00000001000000FF{offset:08X}"  # names no cluster will use
        shutil.copy(src, fake)
        chown_to_postgres(fake)
        return fake

    def ours_push(config: Path) -> list[str]:  # what PostgreSQL runs: the compiled client, when built
        return wal_command(str(config)) + ["wal-push", "--db", "bench"]

    # tool: (command before the path, directory of its segments, first name offset, env)
    tools: dict[str, tuple[list[str], Path, int, dict | None]] = {
        "ours": (ours_push(s.config), seg_dir, 0x10, s.pg_env),
        "ours_archived_ahead": (ours_push(s.config), seg_dir, 0x20, s.pg_env),
        "ours_agent": (ours_push(s.config), agent_wal, 0x31, s.pg_env),
        "pgbackrest": (s.pgbr + ["archive-push"], seg_dir, 0x00, None),
    }
    agents = {"ours_agent": s.config}
    if s.s3 is not None:
        tools["ours_s3"] = (ours_push(s.config_s3), seg_dir, 0x40, s.pg_env)
        tools["ours_s3_agent"] = (ours_push(s.config_s3), agent_wal, 0x51, s.pg_env)
        tools["pgbackrest_s3"] = (s.pgbr_s3 + ["archive-push"], seg_dir, 0x60, None)
        agents["ours_s3_agent"] = s.config_s3
        if s.config_all is not None:
            tools["ours_all"] = (ours_push(s.config_all), seg_dir, 0x80, s.pg_env)
            tools["ours_all_agent"] = (ours_push(s.config_all), agent_wal, 0x91, s.pg_env)
            tools["pgbackrest_multi"] = (s.pgbr_multi + ["archive-push"], seg_dir, 0xA0, None)
            agents["ours_all_agent"] = s.config_all
        if s.barman_bin is not None:
            tools["barman_cloud"] = (
                s.barman("barman-cloud-wal-archive", "--zstd", s.barman_url, "bench"),
                seg_dir,
                0x70,
                s.pg_env,
            )

    # each agent's first call: no agent yet, so it pushes by itself and starts one
    stems, first_call = {}, {}
    for tool, config in agents.items():
        cmd, directory, offset, env = tools[tool]
        stems[tool] = agent_stem(str(agent_wal), push_context(str(config), "bench"), agent_data.stat().st_uid)
        first_call[tool] = _as_postgres(cmd + [str(fake_segment(directory, offset - 1))], env)
        deadline = time.monotonic() + 60
        while True:
            try:
                request(stems[tool] + ".sock", {"status": True}, timeout=10)
                break
            except NotListening:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the archiver agent did not start; see {stems[tool]}.log") from None
                time.sleep(0.1)

    done = dict.fromkeys(tools, 0)

    def push(tool: str) -> float:
        cmd, directory, offset, env = tools[tool]
        fake = fake_segment(directory, offset + done[tool])
        done[tool] += 1
        if tool == "ours_archived_ahead":  # what PostgreSQL's call costs for a segment an earlier call archived ahead
            mark_pushed(fake, push_context(str(s.config), "bench"))
            chown_to_postgres(fake.parent / ".dr_pipelines_pushed")
        took = _as_postgres(cmd + [str(fake)], env)
        fake.unlink()
        return took

    times = alternate({tool: (lambda tool=tool: push(tool)) for tool in tools}, count)
    served = {tool: request(stem + ".sock", {"status": True}, timeout=10)["served"] for tool, stem in stems.items()}
    (agent_data / "postmaster.pid").unlink()  # "the cluster stopped": the agents leave
    for tool, n in served.items():
        if n < count:
            raise SystemExit(f"{tool}: the agent served {n} of {count} pushes: the agent mode measured the wrong path")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "wal_push",
        **_medians(times),
        **{f"{tool}_first_call_s": v for tool, v in first_call.items()},
        "ratio": med["ours"] / med["pgbackrest"],
        "archived_ahead_ratio": med["ours_archived_ahead"] / med["pgbackrest"],
        "agent_ratio": med["ours_agent"] / med["pgbackrest"],
    }


def bench_pitr(s: Setup, free_port, rounds: int = 1) -> dict:
    """Every tool recovers to the same moment; the order rotates each round (the first to write
    gigabytes of new files on this VM pays for fresh memory pages, the next reuse them)."""
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
    from dr_pipelines.core.config import load_config
    from dr_pipelines.core.repository.records import RecordKind, load_reports
    from dr_pipelines.core.storage.locations import open_locations

    job_rto: dict[str, list] = {}  # the reports' rto_s
    job_steps: dict[str, list[dict]] = {}
    peer_steps: dict[str, list[dict]] = {}  # pgBackRest: its restore, then start + replay + promotion

    def new_data_dir(name: str) -> tuple[Path, int]:
        data_dir = s.work / f"pitr-{name}" / "data"
        data_dir.parent.mkdir()
        chown_to_postgres(data_dir.parent)
        return data_dir, free_port()

    def wait_promoted(restored: LocalCluster) -> None:
        while True:
            try:
                with s.connect(restored.port) as c:
                    if not c.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return
            except psycopg.OperationalError:
                pass
            time.sleep(0.2)

    def ours(name: str, config: Path) -> float:
        data_dir, port = new_data_dir(name)
        took = _timed(
            [str(s.ours_bin), "--config", str(config), "pitr", "bench", "--target-time", target.isoformat()]
            + ["--data-dir", str(data_dir), "--port", str(port)],
            s.env,
        )
        LocalCluster(data_dir, port).stop("fast")
        shutil.rmtree(data_dir.parent)
        report = load_reports(open_locations(load_config(config)), "bench", RecordKind.PITR)[0]
        job_rto.setdefault(name, []).append(report.rto_s)
        job_steps.setdefault(name, []).append(report.model_extra["steps_s"])
        return took

    def pgbackrest(name: str, pgbr: list[str]) -> float:
        data_dir, port = new_data_dir(name)
        t0 = time.perf_counter()
        data_dir.mkdir(mode=0o700)
        chown_to_postgres(data_dir)
        _as_postgres(
            pgbr
            + [
                "restore",
                "--type=time",
                f"--target={target:%Y-%m-%d %H:%M:%S.%f}"[:-3] + "+00",
                "--target-action=promote",
                f"--pg1-path={data_dir}",
            ]
        )
        restored_at = time.perf_counter()
        restored = LocalCluster(data_dir, port)
        restored.write_settings({"archive_mode": "off", "unix_socket_directories": "''", "port": str(port)})
        restored.start(timeout=600)
        wait_promoted(restored)
        took = time.perf_counter() - t0
        peer_steps.setdefault(name, []).append(
            {"restore": round(restored_at - t0, 3), "replay": round(took - (restored_at - t0), 3)}
        )
        restored.stop("fast")
        shutil.rmtree(data_dir.parent)
        return took

    def barman_cloud() -> float:
        """barman-cloud-restore picks the backup for the target time ("auto") and downloads it; the
        recovery settings are written by hand (barman-cloud writes none): restore_command through
        barman-cloud-wal-restore, the target, promote."""
        data_dir, port = new_data_dir("barman")
        t0 = time.perf_counter()
        _as_postgres(
            s.barman("barman-cloud-restore", "--target-time", target.isoformat())
            + [s.barman_url, "bench", "auto", str(data_dir)],
            s.pg_env,
        )
        restore_command = " ".join(s.barman("barman-cloud-wal-restore", s.barman_url, "bench", "%f", "%p"))
        restored = LocalCluster(data_dir, port)
        restored.write_settings(
            {
                "archive_mode": "off",
                "unix_socket_directories": "''",
                "port": str(port),
                "restore_command": "'" + restore_command.replace("'", "''") + "'",
                "recovery_target_time": f"'{target.isoformat()}'",
                "recovery_target_action": "'promote'",
            }
        )
        (data_dir / "recovery.signal").touch()
        chown_to_postgres(data_dir / "recovery.signal")
        restored.start(timeout=600, env=s.pg_env)
        wait_promoted(restored)
        took = time.perf_counter() - t0
        restored.stop("fast")
        shutil.rmtree(data_dir.parent)
        return took

    contenders: dict[str, Callable[[], float]] = {
        "ours": lambda: ours("ours", s.config),
        "pgbackrest": lambda: pgbackrest("pgbackrest", s.pgbr),
    }
    if s.s3 is not None:
        contenders["ours_s3"] = lambda: ours("ours_s3", s.config_s3)
        contenders["pgbackrest_s3"] = lambda: pgbackrest("pgbackrest_s3", s.pgbr_s3)
        if s.barman_bin is not None:
            contenders["barman_cloud"] = barman_cloud
    times = alternate(contenders, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "pitr",
        **_medians(times),
        "ratio": med["ours"] / med["pgbackrest"],
        "job_rto_s": job_rto["ours"],
        "job_rto_ratio": statistics.median(job_rto["ours"]) / med["pgbackrest"],
        "job_steps_s": job_steps["ours"],
        "pgbackrest_steps_s": peer_steps["pgbackrest"],
        **(
            {"ours_s3_job_rto_s": job_rto["ours_s3"], "ours_s3_job_steps_s": job_steps["ours_s3"]}
            if "ours_s3" in job_rto
            else {}
        ),
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
