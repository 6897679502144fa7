"""File snapshots against real locations (local disk, moto S3, the GCS emulator), through the
command as an operator runs it, and in process where a fault must be placed exactly."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from dr_pipelines.core.config import ConfigError, load_config
from dr_pipelines.core.files.snapshot import MAX_CHUNK, UPLOADERS
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines_tests.support.configs import AgeKey, local_location, s3_location
from dr_pipelines_tests.support.processes import PROJECT_ROOT, VENV_BIN, reachable_tmpdir, run_cli

MARKER_NAME = "zz-marker-name-7f3a.txt"
MARKER_TEXT = b"zz-marker-content-9c1e " * 50


def write_files_config(
    tmp_path: Path, locations: dict, age_key: AgeKey | None, file_sets: dict, identity: bool = True, **extra
) -> Path:
    encryption: dict = {"method": "none"}
    if age_key is not None:
        encryption = {"method": "age", "recipients": [age_key.recipient]}
        if identity:
            encryption["identity_file"] = str(age_key.identity_file)
    data = {
        "databases": {"app": {"dbname": "app", "port": 1}},  # never contacted by file snapshots
        "locations": locations,
        "encryption": encryption,
        "files": {"state_dir": str(tmp_path / "state"), **extra.pop("files", {})},
        "file_sets": file_sets,
        **extra,
    }
    path = tmp_path / f"dr-{len(list(tmp_path.glob('dr-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_tree(root: Path) -> None:
    """Every kind of thing a tree holds, with the metadata a restore must bring back."""
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(3_000_000))
    (root / "text.txt").write_bytes(b"hello world\n" * 10_000)
    (root / MARKER_NAME).write_bytes(MARKER_TEXT)
    (root / "empty").write_bytes(b"")
    (root / "sub" / "deep" / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "sub" / "deep" / "setuid", 0o4755)
    os.chmod(root / "sub", 0o1777)  # sticky
    os.symlink("text.txt", root / "link")
    os.symlink("../../nowhere", root / "sub" / "dangling")
    os.link(root / "text.txt", root / "sub" / "hard")
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"bad-\xff-name")).write_bytes(b"not utf-8 named")
    with open(root / "sparse", "wb") as f:  # a hole of 50 MB, data at the end
        f.truncate(50 << 20)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    os.chown(root / "text.txt", 1234, 5678)
    try:
        os.setxattr(root / "big.bin", "user.origin", b"upload-42")
    except OSError:
        pass  # a file system without user xattrs: the comparison sees none on either side
    os.utime(root / "big.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def tree_facts(root: Path) -> dict[bytes, tuple]:
    """What a restore must reproduce, per path relative to the root: type, mode, owner, mtime,
    content hash, symlink target, xattrs, and which paths share an inode."""
    out: dict[bytes, tuple] = {}
    inodes: dict[int, bytes] = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, rootb)
            st = os.lstat(path)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            try:
                xattrs = tuple(
                    sorted(
                        (a, os.getxattr(path, a, follow_symlinks=False))
                        for a in os.listxattr(path, follow_symlinks=False)
                    )
                )
            except OSError:
                xattrs = ()
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else None
            mtime = None if stat.S_ISDIR(st.st_mode) and name in (b"sub",) else st.st_mtime_ns
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                content,
                target,
                xattrs,
                first,
            )
    return out


def restored_root(into: Path, source: Path) -> Path:
    return into / str(source.resolve()).lstrip("/")


def cli_json(path: Path, *args: str) -> dict:
    r = run_cli("--config", str(path), *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def snapshot(path: Path, file_set: str = "app", env: dict | None = None) -> str:
    r = run_cli("--config", str(path), "snapshot", file_set, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def stats_of(path: Path, snapshot_id: str) -> dict:
    [snap] = [s for s in cli_json(path, "snapshots", "list")["snapshots"] if s["id"] == snapshot_id]
    return snap["stats"]


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root)
    return root


def test_a_tree_round_trips_through_every_location_with_all_its_metadata(tmp_path, tree, age_key, three_locations):
    path = write_files_config(tmp_path, three_locations, age_key, {"app": {"paths": [str(tree)]}})
    sid = snapshot(path)
    listed = cli_json(path, "snapshots", "list")["snapshots"]
    assert [s["id"] for s in listed] == [sid] and sorted(listed[0]["locations"]) == ["gcs", "local", "s3"]
    for location in ("local", "s3", "gcs"):  # from any one location alone
        into = tmp_path / f"out-{location}"
        r = run_cli("--config", str(path), "restore-files", "app", "--into", str(into), "--location", location)
        assert r.returncode == 0, r.stderr
        assert tree_facts(restored_root(into, tree)) == tree_facts(tree), location
    assert os.stat(restored_root(tmp_path / "out-local", tree) / "sparse").st_blocks * 512 < 1 << 20  # still sparse
    assert run_cli("--config", str(path), "snapshots", "verify", "app").returncode == 0
    # the repository holds no file name and no content in the clear
    for blob in (tmp_path / "backups").rglob("*"):
        if blob.is_file():
            data = blob.read_bytes()
            assert MARKER_NAME.encode() not in data and MARKER_TEXT[:20] not in data, blob


def test_a_second_snapshot_stores_only_the_change_and_a_lost_cache_costs_a_read_not_an_upload(tmp_path, age_key):
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(100):
        (tree / f"f{i:03d}").write_bytes(os.urandom(20_000))
    (tree / "large.bin").write_bytes(os.urandom(8 << 20))
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}
    )
    first = stats_of(path, snapshot(path))
    assert first["bytes_new"] == first["bytes_scanned"] == 100 * 20_000 + (8 << 20)
    (tree / "f007").write_bytes(os.urandom(20_000))  # 1 % of the files changed
    with open(tree / "large.bin", "ab") as f:
        f.write(os.urandom(100_000))  # and an append to the large one
    second = stats_of(path, snapshot(path))
    assert second["unchanged_files"] == 99 and second["changed_files"] == 2
    assert second["bytes_read"] == 20_000 + (8 << 20) + 100_000  # the unchanged cost a stat, not a read
    # only the changed file and the large one's last chunk (its content before the append) are stored again
    assert second["bytes_new"] <= 20_000 + 100_000 + MAX_CHUNK, second
    for cache in (tmp_path / "state").glob("files-cache-*"):
        cache.unlink()
    third = stats_of(path, snapshot(path))
    assert third["bytes_read"] == third["bytes_scanned"] and third["bytes_new"] == 0  # read again, nothing uploaded
    into = tmp_path / "out"
    assert run_cli("--config", str(path), "restore-files", "app", "--into", str(into)).returncode == 0
    assert tree_facts(restored_root(into, tree)) == tree_facts(tree)


def test_identical_content_is_stored_once_across_sets(tmp_path, age_key):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    data = os.urandom(2 << 20)
    (a / "x").write_bytes(data)
    (b / "y").write_bytes(data)
    path = write_files_config(
        tmp_path,
        {"local": local_location(tmp_path / "repo")},
        age_key,
        {"one": {"paths": [str(a)]}, "two": {"paths": [str(b)]}},
    )
    snapshot(path, "one")
    second = stats_of(path, snapshot(path, "two"))
    assert second["bytes_scanned"] == 2 << 20 and second["bytes_new"] == 0


@pytest.mark.faults
def test_the_backup_host_cannot_read_and_a_wrong_identity_writes_nothing(tmp_path, tree, age_key):
    import pyrage

    repo = tmp_path / "repo"
    host = write_files_config(
        tmp_path, {"local": local_location(repo)}, age_key, {"app": {"paths": [str(tree)]}}, identity=False
    )
    sid = snapshot(host)
    into = tmp_path / "out"
    r = run_cli("--config", str(host), "restore-files", "app", "--into", str(into))
    assert r.returncode == 2 and "identity" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not into.exists()
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    data = yaml.safe_load(host.read_text())
    data["encryption"]["identity_file"] = str(wrong)
    host.write_text(yaml.safe_dump(data))
    r = run_cli("--config", str(host), "restore-files", "app", "--snapshot", sid, "--into", str(into))
    assert r.returncode == 2 and "is not one of its recipients" in r.stderr and "nothing was written" in r.stderr
    assert not into.exists()


def test_a_secrets_set_must_be_encrypted_and_its_names_never_show(tmp_path, age_key):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / ".env").write_text("API_KEY=zz-secret-value-51\n")
    with pytest.raises(ConfigError, match="secrets: true.*encryption.method is none"):
        load_config(
            write_files_config(
                tmp_path,
                {"local": local_location(tmp_path / "r")},
                None,
                {"env": {"paths": [str(secrets)], "secrets": True}},
            )
        )
    path = write_files_config(
        tmp_path,
        {"local": local_location(tmp_path / "repo")},
        age_key,
        {"env": {"paths": [str(secrets)], "secrets": True}},
    )
    r = run_cli("--config", str(path), "snapshot", "env")
    assert r.returncode == 0, r.stderr
    assert ".env" not in r.stderr and "zz-secret" not in r.stderr and str(secrets) not in r.stderr
    index = next((tmp_path / "repo").rglob("index.json")).read_text()
    assert ".env" not in index and str(secrets) not in index and json.loads(index)["secrets"] is True


def test_unknown_keys_in_a_file_set_are_named(tmp_path):
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "r")}, None, {"app": {"paths": ["/x"], "exclud": []}}
    )
    with pytest.raises(ConfigError, match=r"file_sets\.app\.exclud: unknown key"):
        load_config(path)


def test_excludes_caches_markers_and_a_symlink_loop(tmp_path, age_key):
    tree = tmp_path / "tree"
    (tree / "keep").mkdir(parents=True)
    (tree / "keep" / "a.txt").write_text("a")
    (tree / "keep" / "debug.log").write_text("log")
    (tree / "tmp").mkdir()
    (tree / "tmp" / "scratch").write_text("s")
    (tree / "cache").mkdir()
    (tree / "cache" / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    (tree / "skipme").mkdir()
    (tree / "skipme" / ".nobackup").write_text("")
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    os.symlink(".", tree / "keep" / "self")
    path = write_files_config(
        tmp_path,
        {"local": local_location(tmp_path / "repo")},
        age_key,
        {
            "app": {
                "paths": [str(tree)],
                "exclude": ["*.log", f"{tree}/tmp"],
                "exclude_caches": True,
                "exclude_if_present": [".nobackup"],
            }
        },
    )
    sid = snapshot(path)
    into = tmp_path / "out"
    assert run_cli("--config", str(path), "restore-files", "app", "--into", str(into)).returncode == 0
    got = sorted(os.fsdecode(p) for p in tree_facts(restored_root(into, tree)))
    assert got == ["keep", "keep/a.txt", "keep/self", "loop1", "loop2"], got
    assert os.readlink(restored_root(into, tree) / "loop1") == "loop2"
    assert stats_of(path, sid)["files"] == 1


@pytest.mark.faults
def test_a_file_that_changes_while_read_is_reported_and_one_that_vanishes_is_skipped(tmp_path, age_key, monkeypatch):
    from dr_pipelines.core.files import snapshot as snapshot_module
    from dr_pipelines.core.files.snapshot import take_snapshot

    tree = tmp_path / "tree"
    tree.mkdir()
    busy = tree / "busy.log"
    busy.write_bytes(os.urandom(60 << 20))
    (tree / "gone").write_bytes(b"soon gone")
    (tree / "stays").write_bytes(b"stays")
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}
    )
    config = load_config(path)
    real_open = os.open

    def vanishing_open(p, flags, *a):  # the file is removed between the listing and the read
        if os.fsdecode(p).endswith("/gone"):
            os.unlink(p)
        return real_open(p, flags, *a)

    monkeypatch.setattr(snapshot_module.os, "open", vanishing_open)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            with open(busy, "ab") as f:
                f.write(b"x")
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    lines: list[str] = []
    try:
        result = take_snapshot(config, "app", open_locations(config), log=lines.append)
    finally:
        stop.set()
        t.join()
    st = result.index.stats
    assert st.changed_while_read == 1 and st.vanished == 1 and st.files == 2
    assert any("kept changing while it was read" in line for line in lines)
    assert any("gone" in line and "removed while the snapshot ran" in line for line in lines)


def test_an_unreadable_file_fails_the_snapshot_unless_the_set_skips_it(tmp_path, age_key):
    base = reachable_tmpdir("drpt-files-")
    tree = base / "tree"
    tree.mkdir()
    (tree / "ok").write_text("ok")
    (tree / "locked").write_text("root only")
    os.chmod(tree / "locked", 0o600)
    for skip in (False, True):
        repo = base / f"repo-{skip}"
        repo.mkdir()
        state = base / f"state-{skip}"
        state.mkdir()
        os.chown(repo, *_postgres_ids())
        os.chown(state, *_postgres_ids())
        path = write_files_config(
            base,
            {"local": local_location(repo)},
            age_key,
            {"app": {"paths": [str(tree)], "skip_unreadable": skip}},
            files={"state_dir": str(state)},
        )
        os.chmod(path, 0o644)
        r = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(VENV_BIN / "dr-pipelines"),
                "--config",
                str(path),
                "snapshot",
                "app",
            ],
            capture_output=True,
            text=True,
            cwd=str(base),
        )
        if skip:
            assert r.returncode == 0, r.stderr
            assert "unreadable" in r.stderr and "locked" in r.stderr
            assert stats_of(path, r.stdout.strip().splitlines()[-1])["skipped"] == 1
        else:
            assert r.returncode == 1 and "could not be read" in r.stderr and "locked" in r.stderr, r.stderr
            assert "skip_unreadable" in r.stderr
            assert cli_json(path, "snapshots", "list")["snapshots"] == []


def _postgres_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def test_a_file_over_2_gb_keeps_memory_flat_and_restores(tmp_path, age_key):
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "huge.img", "wb") as f:  # 2.2 GB, mostly a hole, random data at three places
        for at in (0, 1 << 30, (2 << 30) + (200 << 20)):
            f.seek(at)
            f.write(os.urandom(1 << 20))
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}
    )
    # Measured from a small parent: a child's ru_maxrss counts what it had before exec, a copy of
    # its parent's (pytest's, hundreds of MB late in a session).
    measure = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
        "sys.stdout.write(r.stdout.decode()); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(r.returncode)"
    )
    r = subprocess.run(
        ["/usr/bin/python3", "-c", measure, str(VENV_BIN / "dr-pipelines"), "--config", str(path), "snapshot", "app"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    *out, peak_kb = r.stdout.strip().splitlines()
    sid = out[-1]
    peak_mb = int(peak_kb) / 1024
    print(f"peak RSS of the snapshot of a 2.2 GB file: {peak_mb:.0f} MB")
    assert peak_mb < 400
    st = stats_of(path, sid)
    assert st["bytes_scanned"] > 2 << 30 and st["bytes_stored"] < 20 << 20  # the zeros stored once
    into = tmp_path / "out"
    assert run_cli("--config", str(path), "restore-files", "app", "--into", str(into)).returncode == 0
    restored = restored_root(into, tree) / "huge.img"
    assert restored.stat().st_size == (tree / "huge.img").stat().st_size
    h = [hashlib.sha256(), hashlib.sha256()]
    for i, p in enumerate((tree / "huge.img", restored)):
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                h[i].update(block)
    assert h[0].hexdigest() == h[1].hexdigest()


def _pack_files(repo: Path) -> list[Path]:
    return sorted((repo / "_files" / "packs").rglob("*.pack*"))


@pytest.mark.faults
def test_a_corrupt_or_missing_pack_is_found_and_the_restore_uses_another_location(tmp_path, tree, age_key, s3):
    repo = tmp_path / "repo"
    path = write_files_config(
        tmp_path, {"local": local_location(repo), "s3": s3_location(s3)}, age_key, {"app": {"paths": [str(tree)]}}
    )
    snapshot(path)
    [pack] = _pack_files(repo)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    verify = run_cli("--config", str(path), "snapshots", "verify", "app")
    assert verify.returncode == 1 and "on local: FAILED: pack" in verify.stdout and "(corrupt)" in verify.stdout
    assert "on s3: OK" in verify.stdout
    for damage in ("corrupt", "missing"):
        if damage == "missing":
            pack.unlink()
        into = tmp_path / f"out-{damage}"
        r = run_cli("--config", str(path), "restore-files", "app", "--into", str(into))
        assert r.returncode == 0, r.stderr
        assert "from s3" in r.stderr
        assert tree_facts(restored_root(into, tree)) == tree_facts(tree)
    only_local = run_cli(
        "--config", str(path), "restore-files", "app", "--into", str(tmp_path / "x"), "--location", "local"
    )
    assert only_local.returncode == 1 and "cannot be read from any location" in only_local.stderr
    assert not (tmp_path / "x").exists()  # nothing half-restored stays


@pytest.mark.faults
def test_a_killed_snapshot_leaves_nothing_listed_and_the_next_reuses_or_collects_its_packs(tmp_path, age_key):
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(12):
        (tree / f"part{i:02d}").write_bytes(os.urandom(16 << 20))
    repo = tmp_path / "repo"
    path = write_files_config(
        tmp_path, {"local": local_location(repo)}, age_key, {"app": {"paths": [str(tree)]}}, files={"pack_size_mb": 4}
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "snapshot", "app"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(_pack_files(repo)) < 3:
        time.sleep(0.01)
    assert proc.poll() is None, "the snapshot ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert cli_json(path, "snapshots", "list")["snapshots"] == []  # nothing half-made is listed
    status = run_cli("--config", str(path), "status", "--json")
    assert "never finished: its process died" in status.stdout and "leftovers of killed runs" in status.stdout
    left = len(_pack_files(repo))
    again = run_cli("--config", str(path), "snapshot", "app")
    assert again.returncode == 0, again.stderr
    assert "removed a leftover of a killed run" in again.stderr
    sid = again.stdout.strip().splitlines()[-1]
    # the killed run's packs are reused (its journal says what they hold): not uploaded again. Each
    # uploader may have been killed between writing its pack and journaling it: those are swept
    assert "a killed snapshot stored" in again.stderr
    reused_at_least = (left - UPLOADERS) * (3 << 20)
    assert stats_of(path, sid)["bytes_new"] <= 12 * (16 << 20) - reused_at_least, stats_of(path, sid)
    assert not list((tmp_path / "state" / "tmp").iterdir())  # no manifest temp file (names) stays
    assert not [p for p in repo.rglob(".*") if ".tmp-" in p.name]
    assert run_cli("--config", str(path), "retention", "apply").returncode == 0
    [index] = [json.loads(p.read_text()) for p in repo.rglob("index.json")]
    assert sorted(p.name.split(".")[0] for p in _pack_files(repo)) == sorted(index["packs"])  # no orphan left
    assert run_cli("--config", str(path), "snapshots", "verify", "app").returncode == 0
    into = tmp_path / "out"
    assert run_cli("--config", str(path), "restore-files", "app", "--into", str(into)).returncode == 0
    assert tree_facts(restored_root(into, tree)) == tree_facts(tree)


@pytest.mark.faults
def test_a_full_disk_fails_the_snapshot_cleanly_and_the_next_one_succeeds(tmp_path, age_key):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(6 << 20))
    repo = tmp_path / "repo"
    path = write_files_config(tmp_path, {"local": local_location(repo)}, age_key, {"app": {"paths": [str(tree)]}})

    def small_disk():  # every file this process writes stops at 2 MB, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    r = subprocess.run(
        [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "snapshot", "app"],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
    )
    assert r.returncode == 1 and "every location failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cli_json(path, "snapshots", "list")["snapshots"] == []
    sid = snapshot(path)
    assert run_cli("--config", str(path), "snapshots", "verify", "app", sid).returncode == 0


def test_retention_keeps_the_policy_and_collects_only_unreferenced_packs(tmp_path, age_key):
    tree = tmp_path / "tree"
    tree.mkdir()
    repo = tmp_path / "repo"
    path = write_files_config(
        tmp_path,
        {"local": local_location(repo)},
        age_key,
        {"app": {"paths": [str(tree)]}},
        retention={"daily_days": 0, "weekly_days": 0, "monthly_days": 0, "min_keep": 2},
    )
    ids = []
    for i in range(5):
        (tree / f"gen{i}").write_bytes(os.urandom(1 << 20))  # each snapshot adds a file; gen0 stays in all
        if i >= 2:
            (tree / f"gen{i - 1}").unlink()  # and drops the previous one: its pack is then unreferenced
        ids.append(snapshot(path))
        time.sleep(1.1)  # distinct seconds
    assert run_cli("--config", str(path), "snapshots", "pin", "app", ids[0]).returncode == 0
    plan = cli_json(path, "retention", "plan")
    removed = sorted(d["id"] for d in plan["snapshots"] if not d["keep"])
    assert removed == sorted(ids[1:3])  # min_keep 2 keeps the newest two, the pin keeps the first
    assert plan["packs"]["remove"]  # gen1's content is referenced by no kept snapshot
    # a snapshot running elsewhere: the packs wait for the next collection
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        from dr_pipelines.core.files.locks import LOCKS
        from dr_pipelines.core.owner import owner_tag

        lock = repo / LOCKS / "snapshot-test.json"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps({"owner": owner_tag(sleeper.pid), "started_at": "2026-12-06T00:00:00+00:00"}))
        packs_before = len(_pack_files(repo))
        r = run_cli("--config", str(path), "retention", "apply")
        assert r.returncode == 0, r.stderr
        assert "left for next time (a snapshot was running)" in r.stdout and len(_pack_files(repo)) == packs_before
    finally:
        sleeper.kill()
        sleeper.wait()
    r = run_cli("--config", str(path), "retention", "apply")
    assert r.returncode == 0 and "removed a leftover of a killed run: lock _files/locks/snapshot-test" in r.stderr, (
        r.stderr
    )
    assert len(_pack_files(repo)) < packs_before
    kept = [s["id"] for s in cli_json(path, "snapshots", "list")["snapshots"]]
    assert sorted(kept) == sorted([ids[0], ids[3], ids[4]])
    for sid in kept:
        assert run_cli("--config", str(path), "snapshots", "verify", "app", sid).returncode == 0
        into = tmp_path / f"out-{sid}"
        assert (
            run_cli("--config", str(path), "restore-files", "app", "--snapshot", sid, "--into", str(into)).returncode
            == 0
        )


def test_diff_in_place_confirmation_and_hooks(tmp_path, age_key):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("a")
    (tree / "b").write_text("b")
    marks = tmp_path / "hooks.log"
    path = write_files_config(
        tmp_path,
        {"local": local_location(tmp_path / "repo")},
        age_key,
        {
            "app": {
                "paths": [str(tree)],
                "hooks": {
                    "before": [{"command": ["sh", "-c", f"echo stop >> {marks}"]}],
                    "after": [{"command": ["sh", "-c", f"echo start >> {marks}"]}],
                },
            }
        },
    )
    first = snapshot(path)
    (tree / "a").write_text("A, encrypted by ransomware")
    (tree / "b").unlink()
    (tree / "c").write_text("c")
    second = snapshot(path)
    assert marks.read_text().split() == ["stop", "start", "stop", "start"]
    d = cli_json(path, "snapshots", "diff", "app", first, second)
    assert d["added"] == [f"{tree}/c"] and d["removed"] == [f"{tree}/b"]
    assert [c["path"] for c in d["changed"]] == [str(tree), f"{tree}/a"] and "content" in d["changed"][1]["what"]
    refused = run_cli("--config", str(path), "restore-files", "app", "--snapshot", first, "--in-place")
    assert refused.returncode == 2 and f"--yes {tree}" in refused.stderr
    assert (tree / "a").read_text().startswith("A, encrypted")
    ok = run_cli("--config", str(path), "restore-files", "app", "--snapshot", first, "--in-place", "--yes", str(tree))
    assert ok.returncode == 0, ok.stderr
    assert (tree / "a").read_text() == "a" and (tree / "b").read_text() == "b"


def test_a_mass_change_fails_the_change_rate_check(tmp_path, age_key):
    from dr_pipelines.core.files.catalog import load_snapshots
    from dr_pipelines.core.files.health import check_change_rate

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(50):
        (tree / f"doc{i}").write_bytes(os.urandom(400_000))
    path = write_files_config(
        tmp_path,
        {"local": local_location(tmp_path / "repo")},
        age_key,
        {"app": {"paths": [str(tree)]}},
        files={"change_min_bytes": 0},
    )
    for i in range(5):
        (tree / f"doc{i}").write_bytes(os.urandom(400_000))  # a normal day: one document edited
        snapshot(path)
    config = load_config(path)
    outcome = check_change_rate(config, "app", load_snapshots(open_locations(config), "app").of("app"))
    assert outcome.passed, outcome.description
    for i in range(50):  # every document rewritten at once
        (tree / f"doc{i}").write_bytes(os.urandom(400_000))
    snapshot(path)
    outcome = check_change_rate(config, "app", load_snapshots(open_locations(config), "app").of("app"))
    assert not outcome.passed and "ransomware" in outcome.description
    status = json.loads(run_cli("--config", str(path), "status", "--json").stdout)
    [rate] = [c for c in status["checks"] if c["check"] == "snapshot_change_rate_normal"]
    assert rate["status"] == "warning"


def test_the_manual_path_restores_with_age_zstd_and_python_alone(tmp_path, tree, age_key):
    repo = tmp_path / "repo"
    path = write_files_config(tmp_path, {"local": local_location(repo)}, age_key, {"app": {"paths": [str(tree)]}})
    sid = snapshot(path)
    into = tmp_path / "by-hand"
    r = subprocess.run(
        [
            "/usr/bin/python3",
            str(PROJECT_ROOT / "tools" / "restore_files_by_hand.py"),
            str(repo),
            "app",
            sid,
            str(age_key.identity_file),
            str(into),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    for rel in ("big.bin", "text.txt", MARKER_NAME, "sub/deep/setuid", "sparse", os.fsdecode(b"bad-\xff-name")):
        src, got = tree / rel, restored_root(into, tree) / rel
        assert got.read_bytes() == src.read_bytes() and got.stat().st_mode == src.stat().st_mode, rel
    assert os.readlink(restored_root(into, tree) / "link") == "text.txt"
    assert (restored_root(into, tree) / "sub" / "hard").stat().st_ino == (
        restored_root(into, tree) / "text.txt"
    ).stat().st_ino


def test_the_snapshot_job_and_its_restore_test_through_dagster(tmp_path, tree, age_key, monkeypatch):
    import dagster as dg

    from dr_pipelines.defs.build import build_definitions

    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}
    )
    defs = build_definitions(load_config(path), str(path))
    result = defs.resolve_job_def("files_app__snapshot_job").execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    [mat] = result.asset_materializations_for_node("files__app__snapshot")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert {"files", "bytes_scanned", "bytes_new", "bytes_stored", "dedup_ratio", "changed_files", "duration_s"} <= set(
        md
    )
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "files_restore_test_passed"]
    assert check.passed
    # a pack corrupted on the only location: the next snapshot reuses it (it cannot read it back without
    # the identity), and the restore test that follows in the same run fails it loudly
    for pack in _pack_files(tmp_path / "repo"):
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 1
        pack.write_bytes(bytes(data))
    failed = defs.resolve_job_def("files_app__snapshot_job").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not failed.success
    messages = [
        e.step_failure_data.user_failure_data.description
        for e in failed.all_events
        if e.is_step_failure and e.step_failure_data.user_failure_data is not None
    ]
    assert any("cannot be read from any location" in (m or "") for m in messages), messages


def test_set_names_that_look_like_the_layout_are_safe(tmp_path, age_key):
    """A set named like a part of the repository (packs, keys, logical...) is listed, kept and restored."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(100_000))
    names = ["packs", "keys", "locks", "logical", "base"]
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {n: {"paths": [str(tree)]} for n in names}
    )
    for n in names:
        snapshot(path, n)
    assert sorted(s["file_set"] for s in cli_json(path, "snapshots", "list")["snapshots"]) == sorted(names)
    assert run_cli("--config", str(path), "retention", "apply").returncode == 0
    snapshot(path, "logical")  # its sweep looks for leftovers: none of these is one
    assert len(cli_json(path, "snapshots", "list")["snapshots"]) == len(names) + 1
    for n in names:
        into = tmp_path / f"out-{n}"
        assert run_cli("--config", str(path), "restore-files", n, "--into", str(into)).returncode == 0
        assert (restored_root(into, tree) / "f").read_bytes() == (tree / "f").read_bytes()


def test_a_change_of_compression_or_recipients_never_reuses_a_pack_of_the_old_format(tmp_path, age_key):
    import pyrage

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"same content in every snapshot " * 40_000)
    repo = tmp_path / "repo"
    other = pyrage.x25519.Identity.generate()
    (tmp_path / "other.txt").write_text(f"{other}\n")
    both = tmp_path / "both.txt"
    both.write_text(f"{age_key.identity_file.read_text()}{other}\n")
    snapshots = []
    for compression, recipients in (
        ("none", [age_key.recipient]),
        ("zstd", [age_key.recipient]),
        ("zstd", [str(other.to_public())]),
    ):
        path = write_files_config(
            tmp_path,
            {"local": local_location(repo)},
            age_key,
            {"app": {"paths": [str(tree)]}},
            compression={"method": compression},
        )
        data = yaml.safe_load(path.read_text())
        data["encryption"] = {"method": "age", "recipients": recipients, "identity_file": str(both)}
        path.write_text(yaml.safe_dump(data))
        sid = snapshot(path)
        assert stats_of(path, sid)["bytes_new"] > 0  # the old format's pack is not reused
        snapshots.append((path, sid))
    for path, sid in snapshots:  # each restores, with an identity for each of its recipients
        into = tmp_path / f"out-{sid}"
        r = run_cli("--config", str(path), "restore-files", "app", "--snapshot", sid, "--into", str(into))
        assert r.returncode == 0, r.stderr
        assert (restored_root(into, tree) / "f").read_bytes() == (tree / "f").read_bytes()
    path, sid = snapshots[-1]
    data = yaml.safe_load(path.read_text())
    data["encryption"]["identity_file"] = str(age_key.identity_file)  # the old identity only
    path.write_text(yaml.safe_dump(data))
    r = run_cli("--config", str(path), "restore-files", "app", "--snapshot", sid, "--into", str(tmp_path / "no"))
    assert r.returncode == 2 and "is not one of its recipients" in r.stderr and "Traceback" not in r.stderr


def test_a_backup_host_without_the_identity_runs_its_snapshot_job_and_warns_on_the_restore_test(
    tmp_path, tree, age_key
):
    import dagster as dg

    from dr_pipelines.defs.build import build_definitions

    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}, identity=False
    )
    defs = build_definitions(load_config(path), str(path))
    result = defs.resolve_job_def("files_app__snapshot_job").execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "files_restore_test_passed"]
    assert (
        not check.passed
        and check.severity == dg.AssetCheckSeverity.WARN
        and "no readable age identity" in (check.description or "")
    )


@pytest.mark.faults
def test_a_hardlink_group_survives_its_first_name_vanishing(tmp_path, age_key, monkeypatch):
    from dr_pipelines.core.files import snapshot as snapshot_module
    from dr_pipelines.core.files.snapshot import take_snapshot

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("shared content")
    os.link(tree / "a.txt", tree / "b.txt")
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}
    )
    config = load_config(path)
    real_open = os.open

    def renaming_open(p, flags, *a):
        if os.fsdecode(p).endswith("/a.txt"):
            os.rename(p, tmp_path / "moved-away")
        return real_open(p, flags, *a)

    monkeypatch.setattr(snapshot_module.os, "open", renaming_open)
    take_snapshot(config, "app", open_locations(config), log=lambda m: None)
    monkeypatch.undo()
    into = tmp_path / "out"
    assert run_cli("--config", str(path), "restore-files", "app", "--into", str(into)).returncode == 0
    assert (restored_root(into, tree) / "b.txt").read_text() == "shared content"


def test_an_in_place_restore_never_writes_through_a_symlink(tmp_path, age_key):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chmod(elsewhere, 0o700)
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tree)]}}
    )
    snapshot(path)
    shutil.rmtree(tree / "sub")
    os.symlink(elsewhere, tree / "sub")  # an attacker's link where a directory was
    r = run_cli("--config", str(path), "restore-files", "app", "--in-place", "--yes", str(tree))
    assert r.returncode == 0, r.stderr
    assert list(elsewhere.iterdir()) == [] and stat.S_IMODE(elsewhere.stat().st_mode) == 0o700
    assert not (tree / "sub").is_symlink() and (tree / "sub" / "x").read_text() == "x"


def test_a_missing_path_is_a_clear_error(tmp_path, age_key):
    path = write_files_config(
        tmp_path, {"local": local_location(tmp_path / "repo")}, age_key, {"app": {"paths": [str(tmp_path / "nope")]}}
    )
    r = run_cli("--config", str(path), "snapshot", "app")
    assert r.returncode == 1 and "does not exist" in r.stderr and "file_sets.app.paths" in r.stderr
    assert "Traceback" not in r.stderr


def test_snapshots_at_once_a_location_down_from_the_start_and_paths_that_match_nothing(tmp_path, age_key):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):
        for i in range(200):
            (d / f"f{i}").write_bytes(os.urandom(50_000))
    repo = tmp_path / "repo"
    sets = {"one": {"paths": [str(a)]}, "two": {"paths": [str(b)]}}
    path = write_files_config(tmp_path, {"local": local_location(repo)}, age_key, sets)
    procs = [
        subprocess.Popen(
            [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "snapshot", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("one", "two", "one")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]  # the host's cache is shared
    for _, err in outs:
        assert "Traceback" not in err
    assert len(cli_json(path, "snapshots", "list")["snapshots"]) == 3

    # a location that is down from the start fails the run, as one lost midway does
    dead = write_files_config(
        tmp_path,
        {"local": local_location(repo), "s3": {"type": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9"}},
        age_key,
        sets,
    )
    r = run_cli("--config", str(dead), "snapshot", "one")
    assert r.returncode == 1 and "FAILED on s3" in r.stderr and "stored on local" in r.stderr, r.stderr

    nothing = run_cli(
        "--config", str(path), "restore-files", "one", "--path", f"{a}/nope", "--into", str(tmp_path / "x")
    )
    assert nothing.returncode == 2 and f"{a}/nope" in nothing.stderr and "nothing was restored" in nothing.stderr
    assert not (tmp_path / "x").exists()
    both = run_cli("--config", str(path), "restore-files", "one", "--into", str(tmp_path / "x"), "--in-place")
    assert both.returncode == 2 and "exclude each other" in both.stderr


@pytest.mark.faults
def test_an_s3_server_that_hangs_costs_its_timeout_once_and_the_local_copy_is_kept(tmp_path, age_key):
    import boto3

    from dr_pipelines_tests.support.configs import BUCKET
    from dr_pipelines_tests.support.servers import start_moto

    server = start_moto()
    try:
        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        tree = tmp_path / "tree"
        tree.mkdir()
        for i in range(6):
            (tree / f"f{i}").write_bytes(os.urandom(4 << 20))
        s3 = {**s3_location(server), "read_timeout": "2s", "retry_for": "2s"}
        path = write_files_config(
            tmp_path,
            {"local": local_location(tmp_path / "repo"), "s3": s3},
            age_key,
            {"app": {"paths": [str(tree)]}},
            files={"pack_size_mb": 2},
        )
        proc = subprocess.Popen(
            [str(VENV_BIN / "dr-pipelines"), "--config", str(path), "snapshot", "app"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and len(_pack_files(tmp_path / "repo")) < 1:
            time.sleep(0.01)
        os.kill(server.proc.pid, signal.SIGSTOP)  # the server hangs: connections open, no answer
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
        os.kill(server.proc.pid, signal.SIGCONT)
        assert proc.returncode == 1 and "FAILED on s3" in err and "Traceback" not in err, err
        print(f"S3 hung mid-snapshot: the run ended {took:.1f}s later")
        assert took < 40
        [kept] = cli_json(path, "snapshots", "list", "--location", "local")["snapshots"]
        assert (
            run_cli("--config", str(path), "snapshots", "verify", "app", kept["id"], "--location", "local").returncode
            == 0
        )
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
