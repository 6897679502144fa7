"""File snapshots against restic (Debian's) and `tar -c | zstd -3 | age`, same tree, same run.

    .venv/bin/python bench/files.py                  # ~2 GB tree (scale 1), 2 rounds
    .venv/bin/python bench/files.py --scales 0.5,2   # peak RSS at two sizes (flat: the goal)

The tree: many small files (half text, half random) and a few large ones (one of them text).
Steps, each timed for both tools in one round (the order alternates): first snapshot; change 1 %
of the files and append 16 MB to a large one; second snapshot (with the bytes it stored); full
restore. Goals: each wall time <= restic's; the second snapshot stores <= 2 % of the tree; peak
RSS flat across sizes; the first snapshot <= 1.2x `tar -c | zstd -3 -T0 | age`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pyrage
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DATA = ROOT / "bench" / ".data" / "files"
RESULTS = ROOT / "bench" / "results"


def timed(cmd: list[str], env: dict | None = None, shell: bool = False) -> tuple[float, int]:
    """Wall seconds and the peak RSS (KiB) of the command's process tree (wait4)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", cmd[0]] if shell else cmd, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss


def make_tree(root: Path, scale: float) -> int:
    rng = random.Random(42)
    small = int(16_000 * scale)
    (root / "small").mkdir(parents=True)
    total = 0
    words = [b"audio", b"fingerprint", b"channel", b"video", b"segment", b"hash", b"match", b"score"]
    for i in range(small):
        d = root / "small" / f"d{i % 200:03d}"
        d.mkdir(exist_ok=True)
        size = rng.randint(4_000, 80_000)
        if i % 2:
            data = os.urandom(size)
        else:
            data = b" ".join(rng.choice(words) for _ in range(size // 7))[:size]
        (d / f"f{i:06d}.dat").write_bytes(data)
        total += len(data)
    big = int(1_300_000_000 * scale)
    (root / "large").mkdir()
    for name, text in (("media-a.bin", False), ("media-b.bin", False), ("export.csv", True)):
        with open(root / "large" / name, "wb") as f:
            left = big // 3
            while left > 0:
                block = min(left, 8 << 20)
                if text:
                    f.write(
                        b"".join(b"%d,%d,channel-%d\n" % (i, rng.getrandbits(32), i % 97) for i in range(block // 24))[
                            :block
                        ]
                    )
                else:
                    f.write(os.urandom(block))
                left -= block
        total += (root / "large" / name).stat().st_size
    return total


def change_tree(root: Path, round_no: int) -> None:
    """1 % of the small files rewritten, 16 MB appended to a large one."""
    files = sorted((root / "small").rglob("*.dat"))
    rng = random.Random(round_no)
    for p in rng.sample(files, max(1, len(files) // 100)):
        p.write_bytes(os.urandom(p.stat().st_size))
    with open(root / "large" / "media-a.bin", "ab") as f:
        f.write(os.urandom(16 << 20))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_scale(scale: float, rounds: int) -> dict:
    work = DATA / f"scale-{scale}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = work / "tree"
    tree_bytes = make_tree(tree, scale)
    ident = pyrage.x25519.Identity.generate()
    (work / "id.txt").write_text(f"{ident}\n")
    recipient = str(ident.to_public())
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    results: dict = {"scale": scale, "tree_bytes": tree_bytes, "rounds": []}
    for r in range(rounds):
        for d in ("repo", "state", "restic", "out-ours", "out-restic", "tar"):
            shutil.rmtree(work / d, ignore_errors=True)
        (work / "tar").mkdir()
        cfg = work / "dr.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "databases": {"app": {"dbname": "app", "port": 1}},
                    "locations": {"local": {"type": "local", "path": str(work / "repo")}},
                    "encryption": {"method": "age", "recipients": [recipient], "identity_file": str(work / "id.txt")},
                    "files": {"state_dir": str(work / "state")},
                    "file_sets": {"bench": {"paths": [str(tree)]}},
                }
            )
        )
        subprocess.run(
            ["restic", "init", "-q", "--repository-version", "2", "-r", str(work / "restic")], env=env, check=True
        )
        ours_cmd = [str(VENV_BIN / "dr-pipelines"), "--config", str(cfg), "snapshot", "bench"]
        restic_cmd = ["restic", "-q", "-r", str(work / "restic"), "backup", "--compression", "auto", str(tree)]
        order = ["ours", "restic"] if r % 2 == 0 else ["restic", "ours"]
        row: dict = {}
        for step in ("first", "second"):
            if step == "second":
                change_tree(tree, r)
            before_restic = du(work / "restic")
            for who in order:
                cmd = ours_cmd if who == "ours" else restic_cmd
                row[f"{step}_{who}_s"], row[f"{step}_{who}_rss_kb"] = timed(cmd, env)
            row[f"{step}_restic_stored"] = du(work / "restic") - before_restic
            listed = json.loads(
                subprocess.run(
                    [str(VENV_BIN / "dr-pipelines"), "--config", str(cfg), "snapshots", "list", "bench", "--json"],
                    capture_output=True,
                    check=True,
                ).stdout
            )["snapshots"][0]
            row[f"{step}_ours_stored"] = listed["stats"]["bytes_stored"]
        out = work / "tar" / "tree.tar.zst.age"
        row["tar_s"], _ = timed([f"tar -C {tree} -cf - . | zstd -3 -T0 -q | age -r {recipient} > {out}"], shell=True)
        out.unlink()
        # the same, durable (as a backup must be: our packs and restic's files are fsynced)
        row["tar_sync_s"], _ = timed(
            [f"tar -C {tree} -cf - . | zstd -3 -T0 -q | age -r {recipient} > {out} && sync {out}"], shell=True
        )
        for who in order:
            if who == "ours":
                cmd = [
                    str(VENV_BIN / "dr-pipelines"),
                    "--config",
                    str(cfg),
                    "restore-files",
                    "bench",
                    "--into",
                    str(work / "out-ours"),
                ]
            else:
                cmd = [
                    "restic",
                    "-q",
                    "-r",
                    str(work / "restic"),
                    "restore",
                    "latest",
                    "--target",
                    str(work / "out-restic"),
                ]
            row[f"restore_{who}_s"], row[f"restore_{who}_rss_kb"] = timed(cmd, env)
        results["rounds"].append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def summarize(all_results: list[dict]) -> str:
    from statistics import median

    lines = [
        "| scale (tree) | first: ours / restic | first: ours / tar\\|zstd\\|age (+ sync) | second: ours / restic | second stores (% of tree) | restore: ours / restic | peak RSS ours (snapshot, restore) |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in all_results:
        rows = res["rounds"]

        def m(key: str, rows: list[dict] = rows) -> float:
            return median(r[key] for r in rows)

        lines.append(
            f"| {res['scale']} ({res['tree_bytes'] / 1e9:.2f} GB) "
            f"| {m('first_ours_s'):.1f} / {m('first_restic_s'):.1f} s = **{m('first_ours_s') / m('first_restic_s'):.2f}** "
            f"| {m('first_ours_s'):.1f} / {m('tar_s'):.1f} s = **{m('first_ours_s') / m('tar_s'):.2f}** "
            f"({m('tar_sync_s'):.1f} s synced: **{m('first_ours_s') / m('tar_sync_s'):.2f}**) "
            f"| {m('second_ours_s'):.2f} / {m('second_restic_s'):.2f} s = **{m('second_ours_s') / m('second_restic_s'):.2f}** "
            f"| ours {100 * m('second_ours_stored') / res['tree_bytes']:.2f} %, restic {100 * m('second_restic_stored') / res['tree_bytes']:.2f} % "
            f"| {m('restore_ours_s'):.1f} / {m('restore_restic_s'):.1f} s = **{m('restore_ours_s') / m('restore_restic_s'):.2f}** "
            f"| {m('first_ours_rss_kb') / 1024:.0f} MB, {m('restore_ours_rss_kb') / 1024:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1", help="tree sizes in multiples of ~2 GB (default 1)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not shutil.which("restic"):
        raise SystemExit("restic is not installed: apt-get install restic (./dev bench installs it)")
    results = [bench_scale(float(s), args.rounds) for s in args.scales.split(",")]
    table = summarize(results)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"files-{stamp}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
