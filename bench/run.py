"""Benchmarks: our pipelines against the bare tools, in the same run, on the same data.

    ./dev bench                      # logical backup at 1x (~1.2 GB) and 4x, 3 rounds each
    ./dev bench --scales 1 --rounds 5

Data is pgbench (compresses ~50:1) plus a table of random base64 text (barely compresses), so the
compressor does real work. Results: a table on stdout and JSON in bench/results/.

Logical backup: `dr-pipelines backup` (pg_dump -Fc -Z0 -> zstd -3 -> age -> SHA-256 -> local
location) vs `pg_dump -Fc -Z0 | zstd -T0 -3 > file`. Budget: <= 1.10x wall time; our peak RSS
flat from 1x to 4x.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dr_pipelines.core.postgres.cluster import LocalCluster, chown_to_postgres  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")
VENV_BIN = Path(sys.executable).parent
DATA_DIR = ROOT / "bench" / ".data"
RESULTS = ROOT / "bench" / "results"
PORT = int(os.environ.get("BENCH_PORT", "54399"))  # another checkout's benchmarks may hold 54399


def sh(cmd: str, **kw) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, **kw)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and the peak RSS (KiB) of the command's process tree, via wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss


def prepare_cluster(scale: int) -> LocalCluster:
    """A cluster holding db `bench`: pgbench -s 30*scale + 700 MB*scale of random text."""
    data = DATA_DIR / f"pg-x{scale}"
    cluster = LocalCluster(data, PORT)
    marker = DATA_DIR / f"pg-x{scale}.ready"
    if marker.exists():
        cluster.start()
        return cluster
    cluster.remove()  # a load that was interrupted: start over
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    chown_to_postgres(DATA_DIR)
    cluster.initdb({"fsync": "off", "shared_buffers": "'256MB'", "max_wal_size": "'4GB'", "synchronous_commit": "off"})
    cluster.start()
    print(f"loading data for {scale}x (once; kept in {DATA_DIR})", flush=True)
    with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE bench")
    sh(f"{PG_BIN}/pgbench -i -q -s {30 * scale} -h 127.0.0.1 -p {PORT} -U postgres bench >/dev/null 2>&1")
    with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="bench", autocommit=True) as c:
        c.execute("CREATE EXTENSION pgcrypto")
        c.execute("CREATE TABLE random_text (id bigint PRIMARY KEY, body text NOT NULL)")
        rows_per_batch = 50_000  # 2 KB of base64 a row, ~100 MB a batch
        for batch in range(7 * scale):
            c.execute(
                "INSERT INTO random_text SELECT g, encode(gen_random_bytes(1024), 'base64') || encode(gen_random_bytes(476), 'base64') "
                "FROM generate_series(%s, %s) g",
                (batch * rows_per_batch, (batch + 1) * rows_per_batch - 1),
            )
        c.execute("VACUUM ANALYZE")
        size = c.execute("SELECT pg_size_pretty(pg_database_size('bench'))").fetchone()[0]
    print(f"  database bench at {scale}x: {size}", flush=True)
    marker.touch()
    return cluster


def write_config(work: Path) -> tuple[Path, Path]:
    ident = pyrage.x25519.Identity.generate()
    identity = work / "identity.txt"
    identity.write_text(f"{ident}\n")
    identity.chmod(0o600)
    config = work / "bench.yaml"
    repo = work / "repo"
    config.write_text(
        yaml.safe_dump(
            {
                "databases": {
                    "bench": {
                        "host": "127.0.0.1",
                        "port": PORT,
                        "user": "postgres",
                        "dbname": "bench",
                        "scratch_dir": os.environ.get("BENCH_SCRATCH_DIR", str(work)),
                    }
                },
                "locations": {"local": {"type": "local", "path": str(repo)}},
                "encryption": {"method": "age", "recipients": [str(ident.to_public())], "identity_file": str(identity)},
                "compression": {"method": "zstd", "level": 3},
            }
        )
    )
    return config, repo


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "DR_PIPELINES_CONFIG")}


def psql(sql_text: str) -> None:
    sh(f'{PG_BIN}/psql -q -h 127.0.0.1 -p {PORT} -U postgres -d postgres -c "{sql_text}"')


def _empty_local_repos(config: Path) -> None:
    """Each round writes anew: keep the disk from filling (remote locations are left alone)."""
    for loc in yaml.safe_load(config.read_text())["locations"].values():
        if loc["type"] == "local":
            shutil.rmtree(loc["path"], ignore_errors=True)


def _restore_report(config: Path):
    from dr_pipelines.core.config import load_config
    from dr_pipelines.core.repository.records import RecordKind, load_reports
    from dr_pipelines.core.storage.locations import open_locations

    return load_reports(open_locations(load_config(config)), "bench", RecordKind.RESTORE)[0]


def bench_logical_restore(
    scale: int, rounds: int, work: Path, configs: dict[str, Path] | None = None, streamed: bool = True
) -> dict:
    """Our restore job (fetch + verify + decrypt + decompress + load into staging + validation + swap):
    loading while it decodes (the default), verified whole first then pg_restore -j 2
    (restore_while_decoding: false) and streamed (restore_spool: false), vs `pg_restore -j 2` of the
    same dump from a local plain file; they alternate in one run. `configs`: ours under each name
    (default: one local location, "ours"; bench/peers.py adds "ours_s3"); "ours" must be local."""
    cluster = prepare_cluster(scale)
    try:
        configs = dict(configs or {"ours": write_config(work)[0]})
        config = configs["ours"]
        [repo] = [Path(loc["path"]) for loc in yaml.safe_load(config.read_text())["locations"].values()]
        env = clean_env()
        for cfg in configs.values():
            subprocess.run(
                [str(VENV_BIN / "dr-pipelines"), "--config", str(cfg), "backup", "bench"],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        if streamed:  # the same repository: read through one stream into pg_restore; decoded whole first
            for name, setting in (("ours_streamed", "restore_spool"), ("ours_verified", "restore_while_decoding")):
                raw = yaml.safe_load(config.read_text())
                raw["databases"]["bench"][setting] = False
                configs[name] = work / f"bench-{name}.yaml"
                configs[name].write_text(yaml.safe_dump(raw))
        # "the same dump from a local plain file": our backup, decoded by hand with age and zstd
        plain = work / "plain.pgdump"
        [obj] = [p for p in repo.rglob("dump.pgdump*")]
        sh(f"age -d -i {work / 'identity.txt'} {obj} | zstd -q -d > {plain}")
        commands = {
            "bare": [
                "bash",
                "-o",
                "pipefail",
                "-c",
                f"{PG_BIN}/createdb -h 127.0.0.1 -p {PORT} -U postgres target && "
                f"{PG_BIN}/pg_restore -j 2 --exit-on-error -h 127.0.0.1 -p {PORT} -U postgres -d target {plain}",
            ],
            **{
                name: [
                    str(VENV_BIN / "dr-pipelines"),
                    "--config",
                    str(cfg),
                    "restore",
                    "bench",
                    "--latest",
                    "--into",
                    "target",
                    "--jobs",
                    "2",
                ]
                for name, cfg in configs.items()
            },
        }
        wall = {name: [] for name in commands}
        rto = {name: [] for name in configs}
        steps = {name: [] for name in configs}
        names = list(commands)
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:  # each goes first in turn
                wall[name].append(timed(commands[name], env)[0])
                if name in configs:
                    report = _restore_report(configs[name])
                    rto[name].append(report.rto_s)
                    steps[name].append(report.model_extra["steps_s"])
                psql("DROP DATABASE target")
        leftovers = [p.name for p in work.iterdir() if p.name.startswith("dr-restore-")]
        bare = statistics.median(wall["bare"])
        result = {
            "benchmark": "logical_restore",
            "scale": scale,
            "bare_s": wall["bare"],
            "bare_median_s": bare,
            "job_steps_s": steps,
            "plaintext_left_behind": leftovers,
        }
        for name in configs:  # ours_s, ours_median_s, ratio, job_rto_s, job_rto_ratio; streamed_...; ours_s3_...
            key = name.removeprefix("ours_") if name in ("ours_streamed", "ours_verified") else name
            prefix = "" if name == "ours" else f"{key}_"
            result[f"{key}_s"] = wall[name]
            result[f"{key}_median_s"] = statistics.median(wall[name])
            result[f"{prefix}ratio"] = statistics.median(wall[name]) / bare
            result[f"{prefix}job_rto_s"] = rto[name]
            result[f"{prefix}job_rto_ratio"] = statistics.median(rto[name]) / bare
        return result
    finally:
        cluster.stop()


def bench_logical(scale: int, rounds: int, work: Path, configs: dict[str, Path] | None = None) -> dict:
    """`configs`: ours under each name (default: one local location, "ours"; bench/peers.py adds
    "ours_s3"), each against the same bare pipeline, the order rotating each round."""
    cluster = prepare_cluster(scale)
    try:
        with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="bench") as c:
            db_bytes = c.execute("SELECT pg_database_size('bench')").fetchone()[0]
        configs = configs or {"ours": write_config(work)[0]}
        env = clean_env()
        bare_out = work / "bare.pgdump.zst"
        commands = {
            "bare": [
                "bash",
                "-o",
                "pipefail",
                "-c",
                f"{PG_BIN}/pg_dump -Fc -Z0 -h 127.0.0.1 -p {PORT} -U postgres bench | zstd -q -T0 -3 > {bare_out}",
            ],
            **{
                name: [str(VENV_BIN / "dr-pipelines"), "--config", str(cfg), "backup", "bench"]
                for name, cfg in configs.items()
            },
        }
        timed(commands["bare"], env)  # warm the page cache once
        secs = {name: [] for name in commands}
        rss = {name: [] for name in commands}
        names = list(commands)
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:  # each goes first in turn
                took, peak = timed(commands[name], env)
                secs[name].append(took)
                rss[name].append(peak)
                if name in configs:
                    _empty_local_repos(configs[name])
        bare = statistics.median(secs["bare"])
        result = {
            "benchmark": "logical_backup",
            "scale": scale,
            "db_bytes": db_bytes,
            "bare_s": secs["bare"],
            "bare_median_s": bare,
            "bare_output_bytes": bare_out.stat().st_size,
        }
        for name in configs:  # ours_s, ours_median_s, ratio, ours_peak_rss_mb; ours_s3_...
            prefix = "" if name == "ours" else f"{name}_"
            result[f"{name}_s"] = secs[name]
            result[f"{name}_median_s"] = statistics.median(secs[name])
            result[f"{prefix}ratio"] = statistics.median(secs[name]) / bare
            result[f"{name}_peak_rss_mb"] = max(rss[name]) / 1024
        bare_out.unlink()
        return result
    finally:
        cluster.stop()


def bench_physical(
    scale: int,
    rounds: int,
    work: Path,
    only: set[str],
    s3=None,
    barman_bin: Path | None = None,
    wal_pushes: int = 10,
    gcs_bucket: str | None = None,
) -> list[dict]:
    """`s3` (a bench.physical.S3Endpoint) and `barman_bin`: bench/peers.py's S3 contenders; `gcs_bucket`
    (on the emulator STORAGE_EMULATOR_HOST names): the WAL push to local + S3 + GCS at once."""
    import socket

    from bench.physical import Setup, bench_backlog, bench_base_backup, bench_pitr, bench_wal_push

    if not shutil.which("pgbackrest"):
        raise SystemExit("the physical benchmarks compare with pgBackRest: apt-get install -y pgbackrest")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def every_contender(r: dict) -> None:
        if s3 is not None:
            medians = {k.removesuffix("_median_s"): v for k, v in r.items() if k.endswith("_median_s")}
            print("  medians: " + ", ".join(f"{k} {v:.3f}s" for k, v in medians.items()), flush=True)

    cluster = prepare_cluster(scale)
    write_config(work)
    setup = Setup(
        cluster, PORT, work, VENV_BIN / "dr-pipelines", clean_env(), s3=s3, barman_bin=barman_bin, gcs_bucket=gcs_bucket
    )
    out = []
    try:
        setup.enable()
        if "base" in only or "pitr" in only:
            r = bench_base_backup(setup, rounds)
            out.append(r)
            print(
                f"base backup {scale}x: ours {r['ours_median_s']:.1f}s, pg_basebackup --compress=client-zstd "
                f"{r['bare_median_s']:.1f}s (ratio {r['ratio_vs_pg_basebackup']:.2f}, budget 1.20), pgbackrest "
                f"{r['pgbackrest_median_s']:.1f}s (ratio {r['ratio_vs_pgbackrest']:.2f}, target < 1)",
                flush=True,
            )
            every_contender(r)
        if "walpush" in only:
            r = bench_wal_push(setup, wal_pushes)
            out.append(r)
            print(
                f"wal-push per 16 MB segment: ours {1000 * r['ours_median_s']:.0f} ms, pgbackrest archive-push "
                f"{1000 * r['pgbackrest_median_s']:.0f} ms (ratio {r['ratio']:.2f}); a segment already archived "
                f"ahead: {1000 * r['ours_archived_ahead_median_s']:.0f} ms (ratio {r['archived_ahead_ratio']:.2f}); "
                f"through the warm agent: {1000 * r['ours_agent_median_s']:.0f} ms (ratio {r['agent_ratio']:.2f}; "
                f"the call that starts it {1000 * r['ours_agent_first_call_s']:.0f} ms)",
                flush=True,
            )
            every_contender(r)
        if "pitr" in only:
            r = bench_pitr(setup, free_port, rounds)
            out.append(r)
            print(
                f"PITR to a time during load: `dr-pipelines pitr` {r['ours_median_s']:.1f}s, pgbackrest restore "
                f"--type=time + start + promote {r['pgbackrest_median_s']:.1f}s (ratio {r['ratio']:.2f}); the job's "
                f"own RTO {statistics.median(r['job_rto_s']):.1f}s (ratio {r['job_rto_ratio']:.2f}; steps "
                f"{r['job_steps_s']}; pgBackRest's {r['pgbackrest_steps_s']})",
                flush=True,
            )
            every_contender(r)
        if "backlog" in only:
            r = bench_backlog(setup)
            out.append(r)
            print(
                f"archive backlog, pgbench flat out {r['seconds']}s ({r['wal_mb_per_s']:.0f} MB/s of WAL): at most "
                f"{r['max_ready']} segments waiting (median {r['median_ready']}); drained "
                f"{r['drain_after_load_s']:.1f}s after the load",
                flush=True,
            )
    finally:
        setup.disable()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,4", help="data sizes, in multiples of ~1.2 GB (default 1,4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--only",
        default="backup,restore,base,walpush,pitr,backlog",
        help="which benchmarks: backup, restore (logical); base, walpush, pitr, backlog (physical, "
        "against pg_basebackup and pgBackRest; needs the pgbackrest package). Default: all",
    )
    args = ap.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    only = set(args.only.split(","))
    results = []
    backups = []
    for scale in scales:
        work = Path(tempfile.mkdtemp(prefix="dr-bench-", dir="/var/tmp"))
        try:
            if "backup" in only:
                r = bench_logical(scale, args.rounds, work)
                results.append(r)
                backups.append(r)
                print(
                    f"logical backup {scale}x ({r['db_bytes'] / 1e9:.2f} GB): ours {r['ours_median_s']:.1f}s, "
                    f"pg_dump|zstd {r['bare_median_s']:.1f}s, ratio {r['ratio']:.2f} (budget 1.10), "
                    f"our peak RSS {r['ours_peak_rss_mb']:.0f} MB",
                    flush=True,
                )
            if "restore" in only and scale == scales[0]:
                r = bench_logical_restore(scale, args.rounds, work)
                results.append(r)
                print(
                    f"logical restore {scale}x: `dr-pipelines restore` {r['ours_median_s']:.1f}s (the job's own RTO "
                    f"{statistics.median(r['job_rto_s']):.1f}s), pg_restore -j2 {r['bare_median_s']:.1f}s: ratio "
                    f"{r['ratio']:.2f} (job {r['job_rto_ratio']:.2f}; budget 1.15); streamed (restore_spool: false) "
                    f"{statistics.median(r['streamed_s']):.1f}s: ratio {r['streamed_ratio']:.2f} (job "
                    f"{r['streamed_job_rto_ratio']:.2f}); verified whole first (restore_while_decoding: false) "
                    f"{statistics.median(r['verified_s']):.1f}s: ratio {r['verified_ratio']:.2f} (job "
                    f"{r['verified_job_rto_ratio']:.2f}); plaintext left behind: {r['plaintext_left_behind'] or 'none'}",
                    flush=True,
                )
            if only & {"base", "walpush", "pitr", "backlog"} and scale == scales[0]:
                results += bench_physical(scale, args.rounds, work, only)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if len(backups) > 1:
        growth = backups[-1]["ours_peak_rss_mb"] / backups[0]["ours_peak_rss_mb"]
        print(f"peak RSS {backups[-1]['scale']}x / {backups[0]['scale']}x: {growth:.2f} (flat is ~1.0)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
