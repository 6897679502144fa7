"""The peer table (issue 14, item 5): our logical backup and restore, base backup, WAL push and PITR
against the tools people would otherwise use, on the same data, in the same run, the order rotating
each round; the ratios ours/peer go into bench/README.md (a table between markers this script
rewrites) and bench/peers.png.

    ./dev bench --peers                      # installs pgBackRest (apt) and barman-cloud (bench/.tools)
    .venv/bin/python bench/peers.py --scales 1 --rounds 2

Peers: `pg_dump -Fc -Z0 | zstd -T0 -3`, `pg_restore -j 2`, `pg_basebackup`, pgBackRest (Debian's),
barman-cloud (`barman[cloud]` from PyPI, in its own venv under bench/.tools/peers: the product's lock
stays as it is). Where a tool writes to S3, every tool writes to one moto server on 127.0.0.1, over
TLS (pgBackRest speaks S3 only over TLS), each under its own prefix. The benchmarks themselves are
bench/run.py's and bench/physical.py's; this script starts the S3 endpoint, runs them with the S3
contenders added, and writes the table.
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
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from run import RESULTS, bench_logical, bench_logical_restore, bench_physical, write_config  # noqa: E402

from bench.physical import S3Endpoint, config_with_location  # noqa: E402

TOOLS_VENV = BENCH / ".tools" / "peers"  # ./dev bench --peers installs barman-cloud and matplotlib here
README = BENCH / "README.md"
PNG = BENCH / "peers.png"
BUCKET = "peers"

PEER_LABELS = {
    "bare_logical": "pg_dump -Fc -Z0 | zstd -T0 -3",
    "bare_restore": "pg_restore -j 2 (plain local file)",
    "bare": "pg_basebackup -Ft --compress=client-zstd",
    "pgbackrest": "pgBackRest 2.45",
    "pgbackrest_s3": "pgBackRest 2.45",
    "barman_cloud": "barman-cloud 3.19",
}


def start_s3(work: Path) -> tuple[subprocess.Popen, S3Endpoint]:
    """moto over TLS on 127.0.0.1 (bench/moto_tls.py), a self-signed certificate every client trusts."""
    import boto3

    from dr_pipelines.core.postgres.cluster import free_port
    from dr_pipelines_tests.support.processes import wait_for_port

    cert, key = work / "s3-cert.pem", work / "s3-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    cert.chmod(0o644)  # pgBackRest and barman-cloud run as postgres
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "moto_tls.py"), str(port), str(cert), str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    s3 = S3Endpoint(f"https://127.0.0.1:{port}", port, BUCKET, cert)
    # every client (ours, barman-cloud: boto3) and every cluster's archive_command (server_env passes AWS_*)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CA_BUNDLE=str(cert),
    )
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return proc, s3


def start_gcs() -> tuple[subprocess.Popen, str]:
    """The tests' GCS emulator without its slow multipart parse (bench/gcs_emulator.py) on 127.0.0.1,
    with a bucket; every client and the cluster's archive_command reach it through
    STORAGE_EMULATOR_HOST (server_env passes it)."""
    from dr_pipelines.core.config import GCSLocationConfig
    from dr_pipelines.core.postgres.cluster import free_port
    from dr_pipelines.core.storage.gcs import gcs_client
    from dr_pipelines_tests.support.processes import wait_for_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "gcs_emulator.py"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    gcs_client(GCSLocationConfig(type="gcs", bucket=BUCKET)).create_bucket(BUCKET)
    return proc, BUCKET


def _pair(work: str, where: str, ours: str, peer: str, r: dict, ours_key: str, peer_key: str) -> dict:
    o, p = r[f"{ours_key}_median_s"], r[f"{peer_key}_median_s"]
    return {"work": work, "where": where, "ours": ours, "peer": peer, "ours_s": o, "peer_s": p, "ratio": o / p}


def table_rows(results: list[dict]) -> list[dict]:
    """One row per (ours, peer) pair: medians and ours/peer."""
    rows = []
    by = {r["benchmark"]: r for r in results}
    if r := by.get("logical_backup"):
        label = f"logical backup ({r['db_bytes'] / 1e9:.2f} GB db)"
        rows.append(_pair(label, "local", "dr-pipelines backup", PEER_LABELS["bare_logical"], r, "ours", "bare"))
        if "ours_s3_median_s" in r:
            rows.append(_pair(label, "S3 (peer: local file)", "dr-pipelines backup", PEER_LABELS["bare_logical"], r, "ours_s3", "bare"))  # fmt: skip
    if r := by.get("logical_restore"):
        rows.append(_pair("logical restore", "local", "dr-pipelines restore", PEER_LABELS["bare_restore"], r, "ours", "bare"))  # fmt: skip
        job = {**r, "job_median_s": statistics.median(r["job_rto_s"])}
        rows.append(_pair("logical restore", "local", "restore job RTO (no CLI start-up)", PEER_LABELS["bare_restore"], job, "job", "bare"))  # fmt: skip
        if "ours_s3_median_s" in r:
            rows.append(_pair("logical restore", "S3 (peer: local file)", "dr-pipelines restore", PEER_LABELS["bare_restore"], r, "ours_s3", "bare"))  # fmt: skip
    if r := by.get("base_backup"):
        rows.append(_pair("base backup", "local", "dr-pipelines backup --kind base", PEER_LABELS["bare"], r, "ours", "bare"))  # fmt: skip
        rows.append(_pair("base backup", "local", "dr-pipelines backup --kind base", PEER_LABELS["pgbackrest"], r, "ours", "pgbackrest"))  # fmt: skip
        for peer in ("pgbackrest_s3", "barman_cloud"):
            if f"{peer}_median_s" in r:
                rows.append(_pair("base backup", "S3", "dr-pipelines backup --kind base", PEER_LABELS[peer], r, "ours_s3", peer))  # fmt: skip
    if r := by.get("wal_push"):
        work = "WAL push, one 16 MB segment"
        for ours_key, label in (("ours_agent", "wal-push via the warm agent"), ("ours", "wal-push, a lone call")):
            rows.append(_pair(work, "local", label, PEER_LABELS["pgbackrest"] + " archive-push", r, ours_key, "pgbackrest"))  # fmt: skip
        for ours_key, label in (("ours_s3_agent", "wal-push via the warm agent"), ("ours_s3", "wal-push, a lone call")):
            for peer, peer_label in (("pgbackrest_s3", "pgBackRest 2.45 archive-push"), ("barman_cloud", "barman-cloud-wal-archive --zstd")):  # fmt: skip
                if f"{ours_key}_median_s" in r and f"{peer}_median_s" in r:
                    rows.append(_pair(work, "S3", label, peer_label, r, ours_key, peer))
        for ours_key, label in (
            ("ours_all_agent", "wal-push via the warm agent"),
            ("ours_all", "wal-push, a lone call"),
        ):
            if f"{ours_key}_median_s" in r and "pgbackrest_multi_median_s" in r:
                where = "ours: local + S3 + GCS; peer: posix + S3"
                rows.append(_pair(work, where, label, "pgBackRest 2.45 archive-push, 2 repos", r, ours_key, "pgbackrest_multi"))  # fmt: skip
    if r := by.get("pitr"):
        work = "PITR (restore + replay + promote)"
        job = "PITR job RTO (no CLI start-up)"
        r = {**r, "job_median_s": statistics.median(r["job_rto_s"])}
        rows.append(_pair(work, "local", "dr-pipelines pitr", PEER_LABELS["pgbackrest"], r, "ours", "pgbackrest"))
        rows.append(_pair(work, "local", job, PEER_LABELS["pgbackrest"], r, "job", "pgbackrest"))
        if "ours_s3_job_rto_s" in r:
            r["job_s3_median_s"] = statistics.median(r["ours_s3_job_rto_s"])
        for peer in ("pgbackrest_s3", "barman_cloud"):
            if f"{peer}_median_s" in r:
                rows.append(_pair(work, "S3", "dr-pipelines pitr", PEER_LABELS[peer], r, "ours_s3", peer))
                if "job_s3_median_s" in r:
                    rows.append(_pair(work, "S3", job, PEER_LABELS[peer], r, "job_s3", peer))
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    def secs(v: float) -> str:
        return f"{1000 * v:.0f} ms" if v < 1 else f"{v:.1f} s"

    lines = [
        f"{meta['date']}, scale {meta['scale']}"
        + (f" ({meta['db_gb']:.2f} GB database)" if meta["db_gb"] else "")
        + f", {meta['rounds']} rounds (WAL push: {meta['wal_pushes']} calls per tool), medians; "
        f"`{meta['command']}`; the run took {meta['minutes']:.1f} min. Ratio < 1: ours is faster.",
        "",
        "| work | where | ours | peer | ours | peer | ours / peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peer = row["peer"].replace("|", "\\|")  # a pipeline's bar inside a table cell
        lines.append(
            f"| {row['work']} | {row['where']} | {row['ours']} | {peer} | {secs(row['ours_s'])} | "
            f"{secs(row['peer_s'])} | **{row['ratio']:.2f}** |"
        )
    lines += ["", "![ours / peer, same run](peers.png)"]
    return "\n".join(lines)


def rewrite_section(readme: Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = readme.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = head + block + tail
    else:
        body = body.rstrip("\n") + f"\n\n{block}\n"
    readme.write_text(body)


def plot(rows_json: Path, png: Path) -> None:
    """bench/peers_plot.py in the tools venv (matplotlib is not one of the product's dependencies)."""
    python = TOOLS_VENV / "bin" / "python"
    if not python.exists():
        print(f"no {python}: the plot is skipped (./dev bench --peers installs it)", flush=True)
        return
    subprocess.run([str(python), str(BENCH / "peers_plot.py"), str(rows_json), str(png)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1", help="data size in bench/run.py's units (~1.4 GB each); default 1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wal-pushes", type=int, default=10, help="calls per tool in the WAL push benchmark")
    ap.add_argument(
        "--only", default="backup,restore,base,walpush,pitr", help="a subset of backup,restore,base,walpush,pitr"
    )
    ap.add_argument("--no-readme", action="store_true", help="print the table; leave README.md and peers.png alone")
    ap.add_argument("--from-json", type=Path, help="no run: the table and plot again from a results/peers-*.json")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        return report(saved["results"], saved["meta"], args.from_json, args.no_readme)
    only = set(args.only.split(","))
    barman_bin = TOOLS_VENV / "bin"
    missing = [t for t in ("pgbackrest", "openssl") if not shutil.which(t)]
    if not (barman_bin / "barman-cloud-backup").exists():
        missing.append(f"barman-cloud in {barman_bin}")
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; `./dev bench --peers` installs them")
    started = datetime.now(timezone.utc)
    results: list[dict] = []
    for scale in [int(s) for s in args.scales.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="dr-bench-peers-", dir="/var/tmp"))
        moto = gcs = None
        try:
            moto, s3 = start_s3(work)
            gcs, gcs_bucket = start_gcs()
            config, _ = write_config(work)
            configs = {
                "ours": config,
                "ours_s3": config_with_location(config, s3.location("logical/"), work / "s3.yaml"),
            }
            if "backup" in only:
                r = bench_logical(scale, args.rounds, work, configs)
                results.append(r)
                print(
                    f"logical backup {scale}x: ours {r['ours_median_s']:.1f}s, to S3 {r['ours_s3_median_s']:.1f}s, "
                    f"pg_dump|zstd {r['bare_median_s']:.1f}s: ratios {r['ratio']:.2f}, S3 {r['ours_s3_ratio']:.2f}",
                    flush=True,
                )
            if "restore" in only:
                r = bench_logical_restore(scale, args.rounds, work, configs, streamed=False)
                results.append(r)
                print(
                    f"logical restore {scale}x: ours {r['ours_median_s']:.1f}s (job RTO "
                    f"{statistics.median(r['job_rto_s']):.1f}s), from S3 {r['ours_s3_median_s']:.1f}s, pg_restore -j2 "
                    f"{r['bare_median_s']:.1f}s: ratios {r['ratio']:.2f} (job {r['job_rto_ratio']:.2f}), "
                    f"S3 {r['ours_s3_ratio']:.2f}",
                    flush=True,
                )
            physical = only & {"base", "walpush", "pitr"}
            if physical:
                results += bench_physical(
                    scale,
                    args.rounds,
                    work,
                    physical,
                    s3=s3,
                    barman_bin=barman_bin,
                    wal_pushes=args.wal_pushes,
                    gcs_bucket=gcs_bucket,
                )
        finally:
            from dr_pipelines_tests.support.processes import stop_process

            for server in (moto, gcs):
                if server is not None:
                    stop_process(server)
            shutil.rmtree(work, ignore_errors=True)
        for r in results:
            r.setdefault("scale", scale)
    minutes = (datetime.now(timezone.utc) - started).total_seconds() / 60
    db = next((r["db_bytes"] for r in results if "db_bytes" in r), 0)
    meta = {
        "date": f"{started:%Y-%m-%d}",
        "scale": args.scales,
        "db_gb": db / 1e9,
        "rounds": args.rounds,
        "wal_pushes": args.wal_pushes,
        "minutes": minutes,
        "command": "./dev bench --peers" + (f" --scales {args.scales}" if args.scales != "1" else "")
        + (f" --rounds {args.rounds}" if args.rounds != 2 else ""),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    return report(results, meta, RESULTS / f"peers-{started:%Y%m%dT%H%M%SZ}.json", args.no_readme)


def report(results: list[dict], meta: dict, out: Path, no_readme: bool) -> int:
    rows = table_rows(results)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "results": results}, indent=2))
    text = markdown(rows, meta)
    print(text)
    print(f"results: {out}")
    if not no_readme:
        plot(out, PNG)
        rewrite_section(README, "peers", text)
        print(f"written: {README.relative_to(ROOT)} (between the peers markers), {PNG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
