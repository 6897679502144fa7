"""Restoring a file snapshot, testing one, and comparing two. Only a host with the identity can:
the manifest and packs are encrypted to the recipients.

Every chunk is checked against its keyed id and every file against its SHA-256 as it is written;
a pack that is missing or corrupt on one location is read from the next. Owners (as root), modes,
times, symlinks, hardlinks, xattrs and sparse regions are restored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyrage
import zstandard

from dr_pipelines.core.child_env import tool_env
from dr_pipelines.core.config import ConfigError, DrConfig
from dr_pipelines.core.errors import DrError, UsageError
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.catalog import SnapshotEntry, load_snapshots
from dr_pipelines.core.log import Log
from dr_pipelines.core.storage.base import Location, LocationError, ObjectNotFound

HOLE = 64 << 10
ZEROS = bytes(HOLE)
PACK_CACHE = 3
WRITERS = 4  # files written at once (creating a file costs a round trip to the file system)  # decrypted packs kept in memory while restoring (16 MiB each by default)


class FileRestoreFailed(DrError):
    pass


def _identities(config: DrConfig, entry: SnapshotEntry):
    if entry.index.encryption.get("method") != "age":
        return None
    from dr_pipelines.core.codec.keys import load_identities

    return load_identities(config)


def read_manifest(
    config: DrConfig, locations: dict[str, Location], entry: SnapshotEntry, log: Log = lambda m: None
) -> tuple[dict, Iterator[fmt.Entry]]:
    """The snapshot's header and entries, from the first location whose copy is whole."""
    identities = _identities(config, entry)
    errors = []
    for name in entry.locations:
        loc = locations.get(name)
        if loc is None:
            continue
        try:
            data = loc.get_bytes(entry.manifest_keys[name])
        except LocationError as e:
            errors.append(str(e))
            continue
        if hashlib.sha256(data).hexdigest() != entry.index.manifest_sha256:
            errors.append(f"{name}: the manifest of {entry.id} fails its checksum (corrupt)")
            log(f"warning: {errors[-1]}; trying the next location")
            continue
        if identities is not None:
            try:
                data = pyrage.decrypt(data, identities)
            except Exception:
                from dr_pipelines.core.codec.keys import identity_fingerprints

                raise ConfigError(
                    f"cannot decrypt snapshot {entry.id}: the age identity ({', '.join(identity_fingerprints(identities))}) "
                    f"is not one of its recipients ({', '.join(entry.index.encryption.get('recipients', []))}); "
                    "nothing was written"
                ) from None
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)), encoding="utf-8")
        header = json.loads(lines.readline())
        return header, (fmt.Entry.from_json(json.loads(line)) for line in lines if line.strip())
    raise FileRestoreFailed(f"no location holds a readable manifest of snapshot {entry.id}: " + "; ".join(errors))


def _chunk_map(locations: list[Location], entry: SnapshotEntry) -> dict[bytes, str]:
    """Chunk id -> pack id, from the snapshot's chunk list on the first location whose copy is whole."""
    from dr_pipelines.core.files.snapshot import read_chunk_list

    errors = []
    for loc in locations:
        try:
            return {cid: entry.index.packs[i] for cid, i in read_chunk_list(loc, entry.index)}
        except (LocationError, ValueError) as e:
            errors.append(str(e))
    raise FileRestoreFailed(f"no location holds a readable chunk list of snapshot {entry.id}: {'; '.join(errors)}")


class PackSource:
    """Chunks by id, from the packs of one snapshot: each pack from the first location whose copy
    is whole (its id is its SHA-256), decrypted (age authenticates it), a few kept in memory. For a
    whole restore, the packs are fetched and decrypted ahead, in the order the files need them
    (the index lists them so), beside the writing."""

    AHEAD = 2

    def __init__(self, config: DrConfig, locations: dict[str, Location], entry: SnapshotEntry, log: Log):
        self.locations = [locations[n] for n in entry.locations if n in locations]
        self.locations += [loc for n, loc in locations.items() if n not in entry.locations]
        self.encrypted = entry.index.encryption.get("method") == "age"
        self.identities = _identities(config, entry)
        self.identity_file = config.encryption.identity_path() if self.encrypted else None
        self.where = _chunk_map(self.locations, entry)
        self.compressed = entry.index.compression == "zstd"
        self.cache: OrderedDict[str, tuple[bytes, dict, int]] = OrderedDict()
        self.used: set[str] = set()
        self.log = log
        self.ahead: dict[str, Future] = {}
        self.slots = threading.Semaphore(self.AHEAD)
        self.pool: ThreadPoolExecutor | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.loading: dict[str, Future] = {}  # packs being fetched, for whichever thread asked first

    def prefetch(self, order: list[str]) -> None:
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pack-fetch")

        def feed() -> None:
            for pack_id in order:
                while not self.slots.acquire(timeout=0.5):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                self.ahead[pack_id] = self.pool.submit(self._load, pack_id)  # type: ignore[union-attr]

        threading.Thread(target=feed, name="pack-prefetch", daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _decrypt(self, pack_id: str, data: bytes) -> bytes:
        if self.identities is None:
            return data
        age = shutil.which("age")
        if age and self.identity_file:  # the tool runs on another core (pyrage holds the GIL)
            done = subprocess.run(
                [age, "--decrypt", "--identity", str(self.identity_file)],
                input=data,
                capture_output=True,
                env=tool_env(),
            )
            if done.returncode == 0:
                return done.stdout
        else:
            try:
                return pyrage.decrypt(data, self.identities)
            except Exception:
                pass
        raise FileRestoreFailed(
            f"cannot decrypt pack {pack_id[:16]}: the identity is not one of the recipients it was written to"
        )

    def _load(self, pack_id: str) -> tuple[tuple[bytes, dict, int], str]:
        errors = []
        for loc in self.locations:
            try:
                data = loc.get_bytes(fmt.pack_key(pack_id, self.encrypted))
            except ObjectNotFound:
                errors.append(f"{loc.name}: missing")
                continue
            except LocationError as e:
                errors.append(str(e))
                continue
            if hashlib.sha256(data).hexdigest() != pack_id:
                errors.append(f"{loc.name}: corrupt (checksum)")
                self.log(f"warning: pack {pack_id[:16]} on {loc.name} fails its checksum; trying the next location")
                continue
            body = self._decrypt(pack_id, data)
            table, start = fmt.decode_pack_table(body)
            return (body, table, start), loc.name
        raise FileRestoreFailed(f"pack {pack_id} cannot be read from any location: {'; '.join(errors)}")

    def _pack(self, pack_id: str) -> tuple[bytes, dict, int]:
        """Several writer threads ask at once: the lock guards the bookkeeping only, never a wait."""
        with self.lock:
            if pack_id in self.cache:
                self.cache.move_to_end(pack_id)
                return self.cache[pack_id]
            future = self.loading.get(pack_id)
            if future is None:
                future = self.ahead.pop(pack_id, None)
                if future is not None:
                    self.slots.release()
                else:
                    if self.pool is None:
                        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pack-fetch")
                    future = self.pool.submit(self._load, pack_id)
                self.loading[pack_id] = future
        loaded, where = future.result()
        with self.lock:
            self.loading.pop(pack_id, None)
            self.cache[pack_id] = loaded
            self.used.add(where)
            if len(self.cache) > PACK_CACHE:
                self.cache.popitem(last=False)
        return loaded

    def chunk(self, cid: bytes) -> bytes:
        """The chunk's bytes; each file is checked whole against its SHA-256 as it is written."""
        pack_id = self.where.get(cid)
        if pack_id is None:
            raise FileRestoreFailed(f"chunk {cid.hex()[:16]} is in no pack of the snapshot's index")
        body, table, start = self._pack(pack_id)
        offset, stored, plain = table[cid]
        blob = body[start + offset : start + offset + stored]
        data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=plain) if self.compressed else blob
        if len(data) != plain:
            raise FileRestoreFailed(f"chunk {cid.hex()[:16]} of pack {pack_id[:16]} has the wrong length (corrupt)")
        return data


@dataclass
class FileRestoreReport:
    file_set: str
    snapshot_id: str
    snapshot_created_at: str
    into: str
    started_at: str
    kind: str = "restore"
    files: int = 0
    bytes: int = 0
    entries: int = 0
    verified_files: int = 0
    locations_used: list[str] = field(default_factory=list)
    rto_s: float | None = None
    data_loss_window_s: float | None = None
    passed: bool = False
    error: str | None = None
    mismatches: list[str] = field(default_factory=list)
    finished_at: str | None = None
    backup_id: str | None = None  # the snapshot id, under the name the records' readers use
    backup_created_at: str | None = None


def choose_snapshot(
    locations: dict[str, Location], file_set: str, snapshot: str = "latest", before: datetime | None = None
) -> SnapshotEntry:
    catalog = load_snapshots(locations, file_set)
    if snapshot and snapshot != "latest":
        return catalog.find(file_set, snapshot)
    return catalog.latest(file_set, before)


def _selected(path: bytes, wanted: list[bytes]) -> bool:
    if not wanted:
        return True
    for w in wanted:
        if path == w or path.startswith(w.rstrip(b"/") + b"/") or w.startswith(path.rstrip(b"/") + b"/"):
            return True
    return False


def _target(into: Path, path: bytes) -> bytes:
    return os.path.join(os.fsencode(into), path.lstrip(b"/"))


def _set_meta(target: bytes, e: fmt.Entry, as_root: bool) -> None:
    link = e.type == "symlink"
    if as_root:
        os.chown(target, e.uid, e.gid, follow_symlinks=False)
    for k, v in e.xattrs.items():
        try:
            os.setxattr(target, k, v, follow_symlinks=False)
        except OSError:
            pass  # a file system without xattrs, or a namespace only root may write
    if not link:
        os.chmod(target, e.mode)
    os.utime(target, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def restore_files(
    config: DrConfig,
    locations: dict[str, Location],
    file_set: str,
    into: str | os.PathLike,
    snapshot: str = "latest",
    before: datetime | None = None,
    paths: list[str] | None = None,
    in_place: bool = False,
    confirm: str | None = None,
    log: Log = print,
    entry: SnapshotEntry | None = None,
) -> FileRestoreReport:
    """Restore a snapshot (all of it, or the given paths) under `into` (a new or empty directory;
    the snapshot's absolute paths are recreated below it) or, with `in_place` and a confirmation
    naming the set's paths, over the original paths."""
    from dr_pipelines.core.memory import return_large_buffers

    return_large_buffers()  # packs of 16 MiB, made and freed by several threads
    fs = config.file_set(file_set)
    t0 = time.monotonic()
    started = datetime.now(timezone.utc)
    entry = entry or choose_snapshot(locations, file_set, snapshot, before)
    roots = ",".join(os.path.abspath(p) for p in fs.resolved_paths(config.base_dir))
    if in_place:
        if confirm != roots:
            raise UsageError(
                f"restoring file set {file_set!r} in place overwrites {roots}; confirm by naming it: --yes {roots}"
            )
        dest = Path("/")
    else:
        dest = Path(into).absolute()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UsageError(f"{dest} is not empty: restore into a new or empty directory (or in place, confirmed)")
    report = FileRestoreReport(
        file_set,
        entry.id,
        entry.index.created_at.isoformat(),
        str(dest),
        started.isoformat(),
        backup_id=entry.id,
        backup_created_at=entry.index.created_at.isoformat(),
    )
    _, entries = read_manifest(config, locations, entry, log)  # the identity is checked before anything is written
    source = PackSource(config, locations, entry, log)
    if not paths:
        source.prefetch(entry.index.packs)  # the order the files need them in
    wanted = [os.fsencode(os.path.abspath(p)) for p in (paths or [])]
    as_root = os.geteuid() == 0
    created = not dest.exists()
    dirs: list[tuple[bytes, fmt.Entry]] = []
    restored: dict[bytes, bytes] = {}  # snapshot path -> where it was written (hardlink targets)
    leaders: dict[bytes, fmt.Entry] = {}  # the first file of each hardlink group
    matched: set[bytes] = set()  # the requested paths found in the snapshot
    quiet = entry.index.secrets
    writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="restore-write")
    inflight: deque = deque()  # (future, entry) of files being written, settled in order

    def settle() -> None:
        future, e = inflight.popleft()
        if future.result():
            report.files += 1
            report.bytes += e.size
            report.verified_files += 1
        else:
            report.mismatches.append("(a file of a secrets set)" if quiet else e.shown())

    def write(target: bytes, e: fmt.Entry) -> None:
        inflight.append((writers.submit(_write_file, target, e, source, in_place, as_root), e))
        while len(inflight) > 4 * WRITERS:
            settle()

    try:
        dest.mkdir(parents=True, exist_ok=True)
        for e in entries:
            if e.type == "file" and e.nlink > 1:
                leaders[e.path] = e  # a later name of its group may be selected without it
            if not _selected(e.path, wanted):
                continue
            if wanted:
                matched.update(w for w in wanted if e.path == w or e.path.startswith(w.rstrip(b"/") + b"/"))
            target = _target(dest, e.path)
            parent = os.path.dirname(target)
            if not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
            report.entries += 1
            if e.type == "dir":
                if os.path.islink(target):  # in place: a link where a directory was must not lead outside
                    os.unlink(target)
                if not os.path.isdir(target):
                    os.mkdir(target, 0o700)
                dirs.append((target, e))
                continue
            if e.type == "file":
                write(target, e)
            elif e.type == "hardlink":
                first = restored.get(e.target or b"")
                if first is None:  # its group's first name was not selected: this name gets the content
                    leader = leaders.get(e.target or b"")
                    if leader is None:
                        log(
                            f"warning: hardlink {'(secrets set)' if quiet else e.shown()}: its group's file is not in the snapshot"
                        )
                        continue
                    write(target, leader)
                    restored[leader.path] = target
                else:
                    while inflight:  # its group's file is written first
                        settle()
                    if not os.path.exists(first):
                        continue  # that file failed its SHA-256: reported with it
                    _replace(target, in_place)
                    os.link(first, target)
            elif e.type == "symlink":
                _replace(target, in_place)
                os.symlink(e.target or b"", target)
                _set_meta(target, e, as_root)
            elif e.type == "fifo":
                _replace(target, in_place)
                os.mkfifo(target, e.mode)
                _set_meta(target, e, as_root)
            elif e.type in ("chardev", "blockdev") and as_root:
                _replace(target, in_place)
                os.mknod(target, e.mode | (stat.S_IFCHR if e.type == "chardev" else stat.S_IFBLK), e.rdev)
                _set_meta(target, e, as_root)
            restored[e.path] = target
        while inflight:
            settle()
        unmatched = [os.fsdecode(w) for w in wanted if w not in matched]
        if unmatched:
            raise UsageError(
                f"not in snapshot {entry.id} of {file_set!r}: {', '.join(unmatched)} (paths are absolute, as "
                f"`snapshots diff` and the set's paths show them); "
                + ("the paths that were found are restored" if in_place else "nothing was restored")
            )
        for target, e in reversed(dirs):  # deepest first, so writing inside does not change a parent's time
            _set_meta(target, e, as_root)
        if report.mismatches:
            raise FileRestoreFailed(
                f"{len(report.mismatches)} file(s) of snapshot {entry.id} did not match their SHA-256: "
                + "; ".join(report.mismatches[:5])
            )
    except BaseException as e:
        writers.shutdown(wait=True, cancel_futures=True)
        source.close()
        if created and not in_place:
            shutil.rmtree(dest, ignore_errors=True)  # nothing half-restored stays behind
        if isinstance(e, (OSError, zstandard.ZstdError, fmt.PackFormatError)):
            # of a secrets set, the error's text may hold a file name: say only what went wrong
            detail = (e.strerror or type(e).__name__) if quiet and isinstance(e, OSError) else str(e)
            raise FileRestoreFailed(f"restore of snapshot {entry.id} into {dest} failed: {detail}") from e
        raise
    writers.shutdown()
    source.close()
    report.locations_used = sorted(source.used)
    report.rto_s = round(time.monotonic() - t0, 3)
    report.passed = True
    report.finished_at = datetime.now(timezone.utc).isoformat()
    log(
        f"restored snapshot {entry.id} of {file_set}: {report.files} files, {report.bytes} bytes into {dest} "
        f"in {report.rto_s:.1f}s from {', '.join(report.locations_used) or '(no pack needed)'}; every file's SHA-256 matched"
    )
    return report


def _replace(target: bytes, in_place: bool) -> None:
    if in_place and os.path.lexists(target):
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)


def _write_file(target: bytes, e: fmt.Entry, source: PackSource, in_place: bool, as_root: bool) -> bool:
    """In a writer thread: the file's chunks to a temp name, its SHA-256 checked, renamed into place
    with its metadata. False: the content did not match (nothing is left under its name)."""
    tmp = target + b".dr-restore-tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for cid, n in e.chunks:
            data = source.chunk(cid)
            h.update(data)
            view = memoryview(data)
            for at in range(0, n, HOLE):  # runs of zeros become holes: sparse files stay sparse
                block = view[at : at + HOLE]
                if block == ZEROS[: len(block)]:
                    f.seek(len(block), os.SEEK_CUR)
                else:
                    f.write(block)
        f.truncate(e.size)
    if h.hexdigest() != e.sha256:
        os.unlink(tmp)
        return False
    _replace(target, in_place)
    os.rename(tmp, target)  # over a link, the link itself is replaced: nothing is written outside the tree
    _set_meta(target, e, as_root)
    return True


# --------------------------------------------------------------------------- restore test


def compare_with_manifest(
    config: DrConfig, locations: dict[str, Location], entry: SnapshotEntry, root: Path, log: Log
) -> list[str]:
    """Every restored file's hash and metadata against the manifest: what differs (empty: all match)."""
    _, entries = read_manifest(config, locations, entry, log)
    as_root = os.geteuid() == 0
    out = []
    inodes: dict[bytes, int] = {}
    quiet = entry.index.secrets
    for e in entries:
        target = _target(root, e.path)
        name = "(a secrets file)" if quiet else e.shown()
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            if e.type in ("chardev", "blockdev", "socket") and not as_root:
                continue
            if e.type == "socket":
                continue  # sockets are not restored: a server makes its own
            out.append(f"{name}: missing")
            continue
        inodes[e.path] = st.st_ino
        if e.type == "file":
            h = hashlib.sha256()
            with open(target, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != e.sha256:
                out.append(f"{name}: content differs (SHA-256)")
        if e.type == "hardlink":
            if inodes.get(e.target or b"") != st.st_ino:
                out.append(f"{name}: not a hardlink of its group")
            continue
        if e.type == "symlink" and os.readlink(target) != e.target:
            out.append(f"{name}: symlink target differs")
        if e.type != "symlink" and stat.S_IMODE(st.st_mode) != e.mode:
            out.append(f"{name}: mode {oct(stat.S_IMODE(st.st_mode))}, manifest {oct(e.mode)}")
        if as_root and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            out.append(f"{name}: owner {st.st_uid}:{st.st_gid}, manifest {e.uid}:{e.gid}")
        if st.st_mtime_ns != e.mtime_ns:
            out.append(f"{name}: mtime differs")
    return out


def test_restore_files(
    config: DrConfig, locations: dict[str, Location], file_set: str, snapshot: str = "latest", log: Log = print
) -> FileRestoreReport:
    """Restore into a private scratch directory, compare everything with the manifest, remove it."""
    import tempfile

    from dr_pipelines.core.owner import owner_tag
    from dr_pipelines.core.sweep import OWNER_FILE, SCRATCH_PREFIX

    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX + "files-"))
    (scratch / OWNER_FILE).write_text(owner_tag())  # swept with the restores' scratch if this process dies
    try:
        entry = choose_snapshot(locations, file_set, snapshot)
        report = restore_files(config, locations, file_set, scratch / "tree", entry=entry, log=log)
        report.kind = "restore_test"
        report.mismatches = compare_with_manifest(config, locations, entry, scratch / "tree", log)
        report.passed = not report.mismatches
        if report.mismatches:
            report.error = f"{len(report.mismatches)} difference(s) with the manifest: " + "; ".join(
                report.mismatches[:5]
            )
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- diff


@dataclass
class SnapshotDiff:
    older: str
    newer: str
    added: list[str]
    removed: list[str]
    changed: list[tuple[str, str]]  # (path, what changed)


def _facts(entries: Iterator[fmt.Entry]) -> dict[bytes, tuple]:
    return {e.path: (e.type, e.sha256, e.size, e.mode, e.uid, e.gid, e.target, e.mtime_ns) for e in entries}


def diff_snapshots(config: DrConfig, locations: dict[str, Location], file_set: str, a: str, b: str) -> SnapshotDiff:
    catalog = load_snapshots(locations, file_set)
    older, newer = catalog.find(file_set, a), catalog.find(file_set, b)
    if older.index.created_at > newer.index.created_at:
        older, newer = newer, older
    before = _facts(read_manifest(config, locations, older)[1])
    after = _facts(read_manifest(config, locations, newer)[1])
    names = ("type", "content", "size", "mode", "owner", "owner", "target", "mtime")
    changed = []
    for path in sorted(set(before) & set(after)):
        if before[path] != after[path]:
            what = sorted({n for n, x, y in zip(names, before[path], after[path], strict=True) if x != y})
            changed.append((os.fsdecode(path), ", ".join(what)))
    return SnapshotDiff(
        older.id,
        newer.id,
        [os.fsdecode(p) for p in sorted(set(after) - set(before))],
        [os.fsdecode(p) for p in sorted(set(before) - set(after))],
        changed,
    )
