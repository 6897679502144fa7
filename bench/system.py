"""Whole-system RTO (issue 12): `dr-pipelines recover system` (the full_system_recovery job: the database
and the file set restored in parallel, encrypted and compressed, from one location) against the sum of
the bare tools' times for the same work, in the same run: `pg_restore -j 2` from a plain dump file plus
`tar -x` of a plain tar of the files. Goal: <= 1.2x that sum.

    .venv/bin/python bench/system.py                          # from local; pgbench db at 1x, ~0.5 GB of files
    .venv/bin/python bench/system.py --locations local,s3,gcs # also from S3 (moto) and GCS (the emulator)

The data are bench/run.py's database (kept in bench/.data) and bench/files.py's tree at --files-scale.
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
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from files import make_tree  # noqa: E402  (bench/files.py)
from run import PG_BIN, PORT, RESULTS, prepare_cluster  # noqa: E402  (bench/run.py)

VENV_BIN = Path(sys.executable).parent
TREE_DIR = Path(__file__).resolve().parent / ".data" / "system-tree"


def _connect():
    return psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres", autocommit=True)


def _drop(name: str) -> None:
    with _connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _config(work: Path, location: dict, identity: Path, recipient: str, dbname: str) -> Path:
    path = work / f"system-{dbname}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "databases": {
                    "bench": {"host": "127.0.0.1", "port": PORT, "user": "postgres", "dbname": dbname},
                },
                "locations": {"repo": location},
                "encryption": {"method": "age", "recipients": [recipient], "identity_file": str(identity)},
                "compression": {"method": "zstd", "level": 3},
                "file_sets": {"app": {"paths": [str(TREE_DIR)]}},
                "files": {"state_dir": str(work / "state")},
                "recovery": {"drill_enabled": False},
            },
            sort_keys=False,
        )
    )
    return path


def _locations(names: list[str], work: Path) -> tuple[dict[str, dict], list, dict]:
    from dr_pipelines_tests.support.configs import BUCKET, gcs_location, s3_location
    from dr_pipelines_tests.support.servers import start_gcs_emulator, start_moto

    out: dict[str, dict] = {}
    servers, env = [], {}
    for name in names:
        if name == "local":
            out[name] = {"type": "local", "path": str(work / "repo")}
        elif name == "s3":
            import boto3

            s3 = start_moto()
            servers.append(s3)
            boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            out[name] = {**s3_location(s3), "multipart_chunk_mb": 16}
        elif name == "gcs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            gcs = start_gcs_emulator()
            servers.append(gcs)
            env["STORAGE_EMULATOR_HOST"] = gcs.url
            storage.Client(
                project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.url}
            ).create_bucket(BUCKET)
            out[name] = {**gcs_location(), "chunk_mb": 16}
        else:
            raise SystemExit(f"unknown location {name!r}: choose from local, s3, gcs")
    return out, servers, env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=1, help="database size, bench/run.py's scales (default 1)")
    ap.add_argument("--files-scale", type=float, default=0.25, help="file tree size, bench/files.py's (0.25 ~ 0.5 GB)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--locations", default="local", help="comma-separated: local, s3, gcs (default local)")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    cluster = prepare_cluster(args.scale)
    if not (TREE_DIR / ".ready").exists():
        shutil.rmtree(TREE_DIR, ignore_errors=True)
        print(f"making the file tree (once; kept in {TREE_DIR})", flush=True)
        make_tree(TREE_DIR, args.files_scale)
        (TREE_DIR / ".ready").touch()
    work = Path(tempfile.mkdtemp(prefix="dr-bench-system-", dir="/var/tmp"))
    results = []
    servers: list = []
    try:
        ident = pyrage.x25519.Identity.generate()
        identity = work / "identity.txt"
        identity.write_text(f"{ident}\n")
        identity.chmod(0o600)
        # the bare tools' inputs, made once and not timed: a plain dump file and a plain tar
        dump, tar = work / "bench.dump", work / "tree.tar"
        _wall(
            [
                str(PG_BIN / "pg_dump"),
                "-h",
                "127.0.0.1",
                "-p",
                str(PORT),
                "-U",
                "postgres",
                "-Fc",
                "-Z0",
                "-f",
                str(dump),
                "bench",
            ]
        )
        _wall(["tar", "-cf", str(tar), "-C", "/", str(TREE_DIR).lstrip("/")])
        tree_bytes = sum(p.stat().st_size for p in TREE_DIR.rglob("*") if p.is_file())
        locations, servers, env = _locations(args.locations.split(","), work)
        env = {**os.environ, **env}
        for name, location in locations.items():
            source = _config(work, location, identity, str(ident.to_public()), "bench")
            target = _config(work, location, identity, str(ident.to_public()), "bench_restored")
            _wall([str(VENV_BIN / "dr-pipelines"), "--config", str(source), "backup", "bench"], env)
            _wall([str(VENV_BIN / "dr-pipelines"), "--config", str(source), "snapshot", "app"], env)
            ours, rto, bare_db, bare_files, steps = [], [], [], [], []
            for i in range(args.rounds):
                for tool in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
                    into = work / f"into-{tool}"
                    shutil.rmtree(into, ignore_errors=True)
                    if tool == "ours":
                        _drop("bench_restored")
                        t0 = time.perf_counter()
                        proc = subprocess.run(
                            [str(VENV_BIN / "dr-pipelines"), "--config", str(target), "recover", "system",
                             "--into", str(into), "--method", "logical", "--no-services"],
                            env=env, capture_output=True, text=True,
                        )  # fmt: skip
                        ours.append(time.perf_counter() - t0)
                        if proc.returncode != 0:
                            raise SystemExit(proc.stderr[-3000:])
                        report = json.loads(proc.stdout)
                        rto.append(report["rto_s"])
                        steps.append({c["kind"] + "/" + c["name"]: c["seconds"] for c in report["components"]})
                        inside = [c["steps_s"] for c in report["components"] if c["kind"] == "database"]
                        print(f"  round {i + 1}: database steps {inside}", flush=True)
                    else:
                        _drop("bench_bare")
                        with _connect() as c:
                            c.execute("CREATE DATABASE bench_bare")
                        bare_db.append(
                            _wall([str(PG_BIN / "pg_restore"), "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                                   "-j", "2", "-d", "bench_bare", str(dump)])
                        )  # fmt: skip
                        into.mkdir(parents=True)
                        bare_files.append(_wall(["tar", "-xf", str(tar), "-C", str(into)]))
            bare_sum = statistics.median(bare_db) + statistics.median(bare_files)
            r = {
                "benchmark": "whole_system_rto",
                "location": name,
                "db_bytes": dump.stat().st_size,
                "tree_bytes": tree_bytes,
                "ours_command_s": ours,
                "ours_job_rto_s": rto,
                "ours_components_s": steps,
                "bare_pg_restore_s": bare_db,
                "bare_tar_x_s": bare_files,
                "ratio_command": statistics.median(ours) / bare_sum,
                "ratio_job_rto": statistics.median(rto) / bare_sum,
            }
            results.append(r)
            print(
                f"whole-system RTO from {name} ({r['db_bytes'] / 1e9:.2f} GB dump + {tree_bytes / 1e9:.2f} GB files): "
                f"`recover system` {statistics.median(ours):.1f}s (job RTO {statistics.median(rto):.1f}s; database "
                f"{statistics.median(s['database/bench'] for s in steps):.1f}s and files "
                f"{statistics.median(s['files/app'] for s in steps):.1f}s in parallel) vs pg_restore -j2 "
                f"{statistics.median(bare_db):.1f}s + tar -x {statistics.median(bare_files):.1f}s = {bare_sum:.1f}s: "
                f"ratio {r['ratio_command']:.2f} (job {r['ratio_job_rto']:.2f}; goal <= 1.2)",
                flush=True,
            )
    finally:
        _drop("bench_restored")
        _drop("bench_bare")
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
        cluster.stop("fast")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"system-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
