"""Taking a file snapshot: scan -> cut (FastCDC) -> keyed chunk ids -> new chunks compressed into
encrypted packs -> every location; then the plaintext index, then the encrypted manifest (last:
the commit marker).

The backup host holds only the recipients: it can write packs and manifests, never read them.
It deduplicates without reading old backups: the files cache says which files are unchanged
(one stat each), the chunk table which content the repository holds already (from the indexes).
Memory stays flat: files are cut as streams, the manifest goes to an encrypted temp file as the
scan runs, and at most a few packs are in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyrage
import zstandard
from pydantic import BaseModel, ConfigDict

from dr_pipelines.core.backup.attempts import recorded_attempt
from dr_pipelines.core.codec.keys import age_recipients, recipient_fingerprints
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.cache import FilesCache
from dr_pipelines.core.files.keys import DedupKey, backup_key
from dr_pipelines.core.files.locks import Lock, wait_for_no_gc
from dr_pipelines.core.files.scan import Problem, group_name, type_of, user_name, walk, xattrs_of
from dr_pipelines.core.log import Log
from dr_pipelines.core.memory import return_large_buffers
from dr_pipelines.core.owner import owner_tag
from dr_pipelines.core.repository.manifest import new_backup_id
from dr_pipelines.core.storage.base import Location, LocationError

MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 256 << 10, 1 << 20, 4 << 20
READ_TRIES = 3  # a file that changes while it is read is read again this often
UPLOADERS = 2  # packs encrypted and written at once (the age tool runs beside us)


class SnapshotFailed(DrError):
    pass


class PartialSnapshot(DrError):
    def __init__(self, index: SnapshotIndex, committed: list[str], failed: dict[str, str]):
        super().__init__(
            f"snapshot {index.id} of file set {index.file_set!r} is stored on {', '.join(committed)} but FAILED on "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
            + f". Fix {', '.join(failed)} and take the snapshot again; the copies on {', '.join(committed)} are complete."
        )
        self.index, self.committed, self.failed = index, committed, failed


class SnapshotStats(BaseModel):
    model_config = ConfigDict(extra="ignore")
    files: int = 0
    dirs: int = 0
    others: int = 0  # symlinks, hardlinks, special files
    bytes_scanned: int = 0  # the size of every regular file
    bytes_read: int = 0  # what had to be read (changed or new files)
    bytes_new: int = 0  # plain bytes of chunks the repository did not hold
    bytes_stored: int = 0  # stored (compressed, encrypted) bytes of the new packs
    new_files: int = 0
    changed_files: int = 0
    unchanged_files: int = 0
    new_packs: int = 0
    changed_while_read: int = 0
    skipped: int = 0  # unreadable files, listed (when the set allows skipping them)
    vanished: int = 0

    @property
    def dedup_ratio(self) -> float:
        # nothing new at all: every scanned byte was already stored (a ratio of the tree's size to one byte)
        return round(self.bytes_scanned / max(self.bytes_new, 1), 2) if self.bytes_scanned else 1.0


class SnapshotIndex(BaseModel):
    """Plaintext, beside the manifest: what the backup host needs without the identity (listing,
    deduplication, garbage collection, checks). No file name, no content."""

    model_config = ConfigDict(extra="ignore")
    format: str = fmt.FORMAT
    id: str
    file_set: str
    created_at: datetime
    finished_at: datetime
    duration_s: float
    host: str
    key_id: str
    compression: str
    encryption: dict
    secrets: bool = False
    stats: SnapshotStats
    manifest_size: int
    manifest_sha256: str
    packs: list[str]  # pack ids, with their stored sizes
    pack_sizes: list[int]
    chunks_count: int  # records in chunks.bin: (chunk id, position of its pack in `packs`)
    chunks_sha256: str

    def same_format(self, config: DrConfig) -> bool:
        """Packs of this snapshot can serve a snapshot taken under `config` (same compression,
        encryption and recipients): a pack is reused only in the format it was written in."""
        return (
            self.compression == ("none" if config.compression.method == "none" else "zstd")
            and self.encryption.get("method") == config.encryption.method
            and sorted(self.encryption.get("recipients", [])) == sorted(recipient_fingerprints(config.encryption))
        )

    @property
    def size_bytes(self) -> int:
        return sum(self.pack_sizes)


@dataclass
class SnapshotResult:
    index: SnapshotIndex
    locations: list[str]


# --------------------------------------------------------------------------- packs


class _Packer:
    """Collects new chunks into packs of ~pack_size; each finished pack is shuffled, encrypted,
    written to every live location and read back there before any index refers to it."""

    def __init__(
        self,
        config: DrConfig,
        locations: dict[str, Location],
        cache: FilesCache,
        key: DedupKey,
        log: Log,
        lock: Lock,
        journal: Path,
    ):
        self.lock = lock
        # which chunks each stored pack holds, as soon as it is stored: a run killed before the cache
        # learns them leaves this, and the next run adopts it (FilesCache.adopt_journals)
        self.journal = open(journal, "a")  # noqa: SIM115 -- closed by finish() or abort()
        self.config = config
        self.encrypted = config.encryption.method == "age"
        self.recipients = age_recipients(config.encryption) if self.encrypted else None
        self.compress = config.compression.method != "none"
        self.level = config.compression.level
        self.pack_size = config.files.pack_size_mb << 20
        self.locations = dict(locations)
        self.failed: dict[str, str] = {}
        self.cache, self.key, self.log = cache, key, log
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="compress")
        self.current: list[tuple[bytes, bytes, int]] = []  # (chunk id, stored blob, plain length)
        self.current_bytes = 0
        self.pending: dict[bytes, int] = {}  # chunk id -> sequence number of its pack, until stored
        self.stored: dict[int, str] = {}  # pack sequence number -> pack id
        self.sizes: dict[str, int] = {}
        self.seq = 0
        self.queue: queue.Queue = queue.Queue(maxsize=UPLOADERS)
        self.done: queue.Queue = queue.Queue()  # stored packs, for the main thread to record in the cache
        self.error: BaseException | None = None
        self.bytes_new = 0
        self.failing = threading.Lock()
        self.uploaders = [
            threading.Thread(target=self._upload_loop, name=f"pack-upload-{i}", daemon=True) for i in range(UPLOADERS)
        ]
        for t in self.uploaders:
            t.start()

    def _work(self, data: bytes) -> tuple[bytes, bytes]:
        """In a worker thread (hashing and zstd release the GIL): the chunk's id, and its stored form
        (compressed ahead of knowing whether it is new: a changed file's chunks mostly are)."""
        blob = zstandard.ZstdCompressor(level=self.level).compress(data) if self.compress else data
        return self.key.chunk_id(data), blob

    def submit(self, data) -> Future:
        if self.error is not None:
            raise self.error
        return self.pool.submit(self._work, bytes(data))

    def record_stored(self) -> None:
        """In the main thread (the cache's connection is its own): chunks of stored packs are now known."""
        while True:
            try:
                seq, pack_id, chunk_ids = self.done.get_nowait()
            except queue.Empty:
                return
            self.cache.add_chunks(pack_id, self.key.key_id, chunk_ids)
            for c in chunk_ids:
                if self.pending.get(c) == seq:
                    del self.pending[c]

    def known(self, cid: bytes) -> str | int | None:
        """The pack of a chunk: stored (its id), in a pack of this run not yet stored (its number), or None."""
        where = self.pending.get(cid)
        return where if where is not None else self.cache.pack_of(cid, self.key.key_id)

    def add(self, cid: bytes, blob: bytes, plain_len: int) -> int:
        """A new chunk into the open pack; returns the pack's sequence number."""
        if self.error is not None:
            raise self.error
        self.record_stored()
        seq = self.seq
        self.current.append((cid, blob, plain_len))
        self.pending[cid] = seq
        self.current_bytes += plain_len
        self.bytes_new += plain_len
        if self.current_bytes >= self.pack_size:
            self.seal()
        return seq

    def seal(self) -> None:
        if not self.current:
            return
        chunks = list(self.current)
        random.shuffle(chunks)  # chunk order inside a pack says nothing of the files
        self.queue.put((self.seq, chunks))  # waits while the previous pack is still being written
        self.current, self.current_bytes = [], 0
        self.seq += 1
        if self.error is not None:
            raise self.error

    def _upload_loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            seq, chunks = item
            try:
                body = fmt.encode_pack_body(chunks)
                stored = encrypt_pack(body, self.config) if self.recipients else body
                pack_id = hashlib.sha256(stored).hexdigest()
                key = fmt.pack_key(pack_id, self.encrypted)
                for name, loc in list(self.locations.items()):
                    try:
                        # durable when this returns (local: fsync and rename; S3 and GCS check the bytes
                        # they received against a checksum the client sends); then confirmed whole there
                        loc.put_bytes(key, stored)
                        if loc.size(key) != len(stored):
                            raise LocationError(name, f"pack {pack_id} is not whole after it was written")
                    except LocationError as e:
                        with self.failing:
                            self.failed[name] = str(e)
                            self.locations.pop(name, None)
                        self.log(f"warning: location {name} failed; the snapshot goes on without it: {e}")
                if not self.locations:
                    raise SnapshotFailed("every location failed: " + "; ".join(self.failed.values()))
                ids = [c for c, _, _ in chunks]
                with self.failing:
                    line = {"pack": pack_id, "key_id": self.key.key_id, "chunks": [c.hex() for c in ids]}
                    self.journal.write(json.dumps(line) + "\n")
                    self.journal.flush()
                self.done.put((seq, pack_id, ids))  # the main thread records them
                self.stored[seq] = pack_id
                self.sizes[pack_id] = len(stored)
                self.lock.refresh()  # a long snapshot's lock stays fresh: its packs are never collected
            except BaseException as e:
                self.error = e

    def finish(self) -> None:
        self.seal()
        for _ in self.uploaders:
            self.queue.put(None)
        for t in self.uploaders:
            t.join()
        self.pool.shutdown()
        self.journal.close()
        if self.error is not None:
            raise self.error
        self.record_stored()

    def abort(self) -> None:
        self.journal.close()
        self.error = self.error or SnapshotFailed("aborted")
        for _ in self.uploaders:
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                pass
        self.pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- the snapshot


def encrypt_pack(body: bytes, config: DrConfig) -> bytes:
    """To the recipients: with the age tool where installed (another core: pyrage holds the GIL
    while it encrypts), else in process."""
    age = shutil.which("age")
    if age is None:
        return pyrage.encrypt(body, age_recipients(config.encryption))
    from dr_pipelines.core.child_env import tool_env

    argv = [age, "--encrypt", *(a for r in config.encryption.recipients for a in ("-r", r))]
    done = subprocess.run(argv, input=body, capture_output=True, env=tool_env())
    if done.returncode != 0:
        raise SnapshotFailed(f"age could not encrypt a pack: {done.stderr.decode(errors='replace').strip()[-300:]}")
    return done.stdout


def repository_name(config: DrConfig) -> str:
    """What names the host's cache: the repository (its locations) and the format packs are written
    in, so a change of compression, encryption or recipients never reuses a pack of the old one."""
    where = "|".join(f"{n}={config.locations[n].model_dump_json()}" for n in sorted(config.locations))
    return f"{where}|{config.compression.method}|{config.encryption.method}|{recipient_fingerprints(config.encryption)}"


def read_chunk_list(location: Location, index: SnapshotIndex) -> list[tuple[bytes, int]]:
    data = location.get_bytes(fmt.chunks_key(index.file_set, index.id))
    if hashlib.sha256(data).hexdigest() != index.chunks_sha256:
        raise LocationError(location.name, f"the chunk list of snapshot {index.id} fails its checksum (corrupt)")
    return fmt.decode_chunk_records(data)


def refresh_known(config: DrConfig, cache: FilesCache, locations: dict[str, Location], log: Log) -> None:
    """Bring the chunk table up to date with the repository: the chunks of indexes not seen yet, and
    none whose pack is gone (removed by retention)."""
    sizes: dict[str, int] = {}
    indexes: dict[str, Location] = {}
    for name, loc in locations.items():
        try:
            objs = list(loc.list(f"{fmt.ROOT}/"))
        except LocationError as e:
            log(f"warning: cannot list {name}: {e}")
            continue
        for o in objs:
            if o.key.startswith(f"{fmt.ROOT}/packs/"):
                sizes[fmt.pack_id_of(o.key)] = o.size
            elif o.key.startswith(fmt.SETS + "/") and o.key.endswith("/" + fmt.INDEX) and o.key not in indexes:
                indexes[o.key] = loc
    for key, loc in indexes.items():
        if cache.seen_index(key):
            continue
        try:
            idx = SnapshotIndex.model_validate_json(loc.get_bytes(key))
            if not idx.same_format(config):
                cache.add_index(key, idx.key_id, idx.packs, [])  # packs in another format: never reused
                continue
            chunks = read_chunk_list(loc, idx)
        except (LocationError, ValueError):
            continue  # another location's copy, or the next run
        cache.add_index(key, idx.key_id, idx.packs, chunks)
    cache.set_packs(sizes)


def take_snapshot(config: DrConfig, file_set: str, locations: dict[str, Location], log: Log = print) -> SnapshotResult:
    """Take one snapshot of `file_set`, recording the attempt (success or failure) beside it."""
    config.file_set(file_set)
    return_large_buffers()
    if not locations:
        raise SnapshotFailed("no location to write to")
    started = datetime.now(timezone.utc)
    snapshot_id = new_backup_id(started)
    from dr_pipelines.core.files.sweep import sweep_snapshot_leftovers

    sweep_snapshot_leftovers(config, locations, log)

    def said(e: BaseException) -> str:  # the record is plaintext: of a secrets set, only our own messages
        return str(e) if isinstance(e, DrError) or not config.file_set(file_set).secrets else type(e).__name__

    subject: dict[str, object] = {"kind": "snapshot", "file_set": file_set}
    owner = fmt.records_owner(file_set)
    with recorded_attempt(locations, owner, started, snapshot_id, subject, log, said) as record:
        result = _run_hooks_around(
            config, file_set, lambda: _snapshot(config, file_set, locations, log, started, snapshot_id), log
        )
        st = result.index.stats
        record.update(
            succeeded=True,
            error=None,
            stored_on=result.locations,
            size_bytes=st.bytes_stored,
            bytes_new=st.bytes_new,
            bytes_scanned=st.bytes_scanned,
            changed_files=st.changed_files + st.new_files,
        )
    return result


def _run_hooks_around(config: DrConfig, file_set: str, work, log: Log):
    from dr_pipelines.core.restore.app_hooks import HookFailed, describe, run_hook

    hooks = config.file_set(file_set).hooks
    timeout = hooks.timeout.total_seconds()
    try:
        for hook in hooks.before:
            log(f"file set {file_set}: before the snapshot: {describe(hook)}")
            try:
                run_hook(hook, timeout)
            except HookFailed as e:
                raise SnapshotFailed(
                    f"the before hook of file set {file_set!r} failed, nothing was read: {e}"
                ) from None
        return work()
    finally:
        for hook in hooks.after:  # also after a failure: a stopped service must come back
            log(f"file set {file_set}: after the snapshot: {describe(hook)}")
            try:
                run_hook(hook, timeout)
            except HookFailed as e:
                log(f"warning: the after hook of file set {file_set!r} failed: {e}")


def _snapshot(
    config: DrConfig, file_set: str, locations: dict[str, Location], log: Log, started: datetime, snapshot_id: str
) -> SnapshotResult:
    fs = config.file_set(file_set)
    t0 = time.monotonic()
    quiet = fs.secrets  # a secrets set: no file name in any message

    def shown(path: bytes) -> str:
        return "(a file of a secrets set)" if quiet else os.fsdecode(path)

    with Lock("snapshot", locations) as lock:
        if not lock.held:
            raise SnapshotFailed("every location failed: " + "; ".join(lock.refused.values()))
        wait_for_no_gc(lock, log)
        locations = dict(lock.held)  # packs go only where the lock protects them from a pack collection
        key = backup_key(config, locations, log)
        state = config.files.resolved_state_dir(config.base_dir)
        cache = FilesCache(state, repository_name(config))
        tmp_dir = state / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cache.adopt_journals(tmp_dir, log)
        plain_manifest = tmp_dir / f"manifest-{snapshot_id}.{owner_tag().replace(':', '+')}.zst"
        sealed_manifest = plain_manifest.with_suffix(".sealed")
        packer = None
        try:
            refresh_known(config, cache, locations, log)
            cache.begin()
            journal = tmp_dir / f"packs-{cache.name}-{snapshot_id}.{owner_tag().replace(':', '+')}.jsonl"
            packer = _Packer(config, locations, cache, key, log, lock, journal)
            packer.failed.update(lock.refused)  # a location down from the start fails the run as one lost later
            for name, why in lock.refused.items():
                log(f"warning: location {name} failed; the snapshot goes on without it: {why}")
            stats = SnapshotStats()
            problems: list[Problem] = []
            used: dict[bytes, str | int] = {}  # chunk id -> pack id (stored) or sequence number (this run's)
            cdc = _chunker()
            hardlinks: dict[tuple[int, int], bytes] = {}
            fd = os.open(plain_manifest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
                header = {
                    "format": fmt.FORMAT,
                    "file_set": file_set,
                    "id": snapshot_id,
                    "created_at": started.isoformat(),
                    "key_id": key.key_id,
                    "roots": [os.fsdecode(os.path.abspath(p)) for p in fs.resolved_paths(config.base_dir)],
                }
                out.write(json.dumps(header).encode() + b"\n")
                pipeline = _Pipeline(out, file_set, cache, key, packer, used)
                missing = [str(p) for p in fs.resolved_paths(config.base_dir) if not os.path.lexists(p)]
                if missing:
                    named = f"{len(missing)} of its paths" if quiet else ", ".join(missing)
                    raise SnapshotFailed(
                        f"file set {file_set!r}: {named} does not exist; fix file_sets.{file_set}.paths"
                    )
                for path, st in walk(fs.resolved_paths(config.base_dir), fs, problems.append):
                    entry = _entry(path, st)
                    if entry.type == "dir":
                        stats.dirs += 1
                    elif entry.type == "file" and st.st_nlink > 1 and (st.st_dev, st.st_ino) in hardlinks:
                        entry.type, entry.target = "hardlink", hardlinks[(st.st_dev, st.st_ino)]
                        stats.others += 1
                    elif entry.type == "file":
                        try:
                            reading = _content(entry, st, file_set, cache, key, packer, cdc, used, stats, pipeline)
                        except FileNotFoundError:
                            problems.append(Problem(path, "vanished", "removed while the snapshot ran"))
                            continue
                        except OSError as e:
                            problems.append(Problem(path, "unreadable", e.strerror or str(e)))
                            continue
                        if st.st_nlink > 1:  # only once its content is in: later names link to it
                            hardlinks[(st.st_dev, st.st_ino)] = path
                            entry.nlink = st.st_nlink
                        stats.files += 1
                        stats.bytes_scanned += entry.size
                        if entry.changed_while_read:
                            stats.changed_while_read += 1
                            log(
                                f"warning: {shown(path)} kept changing while it was read; the snapshot holds its last read"
                            )
                        pipeline.push(entry, reading)
                        continue
                    else:
                        if entry.type == "symlink":
                            try:
                                entry.target = os.readlink(path)
                            except OSError:  # removed (or replaced) since it was listed
                                problems.append(Problem(path, "vanished", "removed while the snapshot ran"))
                                continue
                        stats.others += 1
                    pipeline.push(entry, None)
                pipeline.drain()
            packer.finish()
            cache.commit()

            unreadable = [p for p in problems if p.what == "unreadable"]
            stats.vanished = sum(p.what == "vanished" for p in problems)
            for p in problems:
                log(f"{'warning' if p.what == 'vanished' else 'unreadable'}: {shown(p.path)}: {p.detail}")
            if unreadable and not fs.skip_unreadable:
                raise SnapshotFailed(
                    f"{len(unreadable)} file(s) of file set {file_set!r} could not be read"
                    + ("" if quiet else f" ({', '.join(os.fsdecode(p.path) for p in unreadable[:5])})")
                    + "; nothing was committed. Fix their permissions, exclude them, or set skip_unreadable: true"
                )
            stats.skipped = len(unreadable)

            # every pack this snapshot refers to, by id, and its chunk list (streamed to a temp file)
            position: dict[str, int] = {}
            chunk_list = tmp_dir / f"chunks-{snapshot_id}.{owner_tag().replace(':', '+')}.bin"
            chunk_hash = hashlib.sha256()
            with open(chunk_list, "wb") as cl:
                for cid, where in used.items():
                    pack_id = packer.stored[where] if isinstance(where, int) else where
                    record = fmt.encode_chunk_record(cid, position.setdefault(pack_id, len(position)))
                    chunk_hash.update(record)
                    cl.write(record)
            chunks_count = len(used)
            used.clear()
            live = dict(packer.locations)
            pack_list = list(position)
            _ensure_packs_everywhere(pack_list, live, packer.failed, config.encryption.method == "age", log)
            if not live:
                raise SnapshotFailed("every location failed: " + "; ".join(packer.failed.values()))
            stats.new_packs = len(packer.stored)
            stats.bytes_new = packer.bytes_new
            stats.bytes_stored = sum(packer.sizes.values())

            # the manifest, sealed (encrypted) into a temp file: its hash goes into the index
            manifest_size, manifest_sha = _seal(plain_manifest, sealed_manifest, packer.recipients)
            plain_manifest.unlink()
            index = SnapshotIndex(
                id=snapshot_id,
                file_set=file_set,
                created_at=started,
                finished_at=datetime.now(timezone.utc),
                duration_s=round(time.monotonic() - t0, 3),
                host=socket.gethostname(),
                key_id=key.key_id,
                compression="zstd" if packer.compress else "none",
                encryption={
                    "method": config.encryption.method,
                    "recipients": recipient_fingerprints(config.encryption),
                },
                secrets=fs.secrets,
                stats=stats,
                manifest_size=manifest_size,
                manifest_sha256=manifest_sha,
                packs=pack_list,
                pack_sizes=[_pack_size(p, packer.sizes, cache) for p in pack_list],
                chunks_count=chunks_count,
                chunks_sha256=chunk_hash.hexdigest(),
            )
            committed = _commit(index, chunk_list, sealed_manifest, live, packer.failed, packer.encrypted, log)
        except BaseException:
            if packer is not None:
                packer.abort()
            raise
        finally:
            cache.close()
            for temp in tmp_dir.glob(f"*-{snapshot_id}.{owner_tag().replace(':', '+')}.*"):
                temp.unlink(missing_ok=True)
    st = index.stats
    log(
        f"snapshot {snapshot_id} of {file_set}: {st.files} files, {st.bytes_scanned} bytes scanned, "
        f"{st.bytes_new} new ({st.bytes_stored} stored in {st.new_packs} packs), on {', '.join(committed)} "
        f"in {index.duration_s:.1f}s"
    )
    if packer.failed:
        raise PartialSnapshot(index, committed, packer.failed)
    return SnapshotResult(index, committed)


def _chunker():
    from pyfastcdc import FastCDC

    return FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)


def _entry(path: bytes, st: os.stat_result) -> fmt.Entry:
    return fmt.Entry(
        path=path,
        type=type_of(st.st_mode),
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        user=user_name(st.st_uid),
        group=group_name(st.st_gid),
        mtime_ns=st.st_mtime_ns,
        xattrs=xattrs_of(path),
        rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
    )


def _content(
    entry: fmt.Entry,
    st: os.stat_result,
    file_set: str,
    cache: FilesCache,
    key: DedupKey,
    packer: _Packer,
    cdc,
    used: dict[bytes, str | int],
    stats: SnapshotStats,
    pipeline: _Pipeline,
) -> _Reading | None:
    """A regular file's SHA-256, and its chunks: from the cache when it is unchanged (one stat;
    None is returned), else read, cut and handed to the workers (their futures, in order)."""
    hit = cache.lookup(file_set, entry.path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, key.key_id)
    if hit is not None:
        sha, chunks = hit
        packs = [used[c] if c in used else packer.known(c) for c, _ in chunks]
        if all(p is not None for p in packs):
            for (c, _), p in zip(chunks, packs, strict=True):
                used.setdefault(c, p)  # type: ignore[arg-type]
            entry.size, entry.sha256, entry.chunks = st.st_size, sha, chunks
            stats.unchanged_files += 1
            return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOATIME", 0)
    reading = _Reading()
    for attempt in range(READ_TRIES):
        try:
            fd = os.open(entry.path, flags)
        except PermissionError:
            if flags & getattr(os, "O_NOATIME", 0):  # O_NOATIME needs ownership; root or the owner only
                flags &= ~getattr(os, "O_NOATIME", 0)
                fd = os.open(entry.path, flags)
            else:
                raise
        with open(fd, "rb", buffering=0) as f:
            before = os.fstat(f.fileno())
            digest, reading, size = hashlib.sha256(), _Reading(), 0  # a re-read starts afresh
            if before.st_size < MIN_CHUNK:
                pieces = [f.read()]
            else:
                pieces = (c.data for c in cdc.cut_stream(f))
            for data in pieces:
                if not len(data):
                    continue
                digest.update(data)
                pipeline.submit(reading, data)
                size += len(data)
            after = os.fstat(f.fileno())
        stats.bytes_read += size
        same = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
            after.st_size,
            after.st_mtime_ns,
            after.st_ctime_ns,
        )
        if same and size == after.st_size:
            break
        if attempt == READ_TRIES - 1:
            entry.changed_while_read = True
        st = after
    entry.size, entry.sha256 = size, digest.hexdigest()
    entry.mtime_ns = st.st_mtime_ns
    entry.ctime_ns, entry.ino = st.st_ctime_ns, st.st_ino  # for the cache, once its chunks are known
    if hit is not None or cache.has_path(file_set, entry.path):
        stats.changed_files += 1
    else:
        stats.new_files += 1
    return reading


class _Reading:
    """One read of one file: its chunks as the workers return them, in order."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []
        self.waiting = 0  # chunks still with the workers


class _Pipeline:
    """Entries in scan order, each written to the manifest once its chunks are known. The workers
    hash and compress ahead, within a window of chunks that spans files and bounds a large one
    too: memory stays flat however large a file or the tree."""

    WINDOW = 8  # chunks in flight (at most 4 MiB each, plain and compressed)

    def __init__(self, out, file_set: str, cache: FilesCache, key: DedupKey, packer: _Packer, used: dict):
        self.out, self.file_set, self.cache, self.key, self.packer, self.used = out, file_set, cache, key, packer, used
        self.items: deque = deque()  # (entry, its reading or None), in scan order
        self.futures: deque = deque()  # (future, plain length, reading), in submission order

    def submit(self, reading: _Reading, data) -> None:
        self.futures.append((self.packer.submit(data), len(data), reading))
        reading.waiting += 1
        while len(self.futures) > self.WINDOW:
            self._resolve_first()

    def push(self, entry: fmt.Entry, reading: _Reading | None) -> None:
        self.items.append((entry, reading))
        self._write_ready()

    def drain(self) -> None:
        while self.futures:
            self._resolve_first()
        self._write_ready()

    def _resolve_first(self) -> None:
        self.packer.record_stored()  # as soon as packs are stored: a kill after this loses no upload
        future, n, reading = self.futures.popleft()
        cid, blob = future.result()
        reading.chunks.append((cid, n))
        reading.waiting -= 1
        if cid not in self.used:  # (a discarded re-read's chunks are stored too: harmless, collected later)
            known = self.packer.known(cid)
            self.used[cid] = self.packer.add(cid, blob, n) if known is None else known
        self._write_ready()

    def _write_ready(self) -> None:
        while self.items and (self.items[0][1] is None or self.items[0][1].waiting == 0):
            entry, reading = self.items.popleft()
            if reading is not None:
                entry.chunks = reading.chunks
                if not entry.changed_while_read:
                    self.cache.remember(
                        self.file_set,
                        entry.path,
                        entry.size,
                        entry.mtime_ns,
                        entry.ctime_ns,
                        entry.ino,
                        self.key.key_id,
                        entry.sha256 or "",
                        entry.chunks,
                    )
            self.out.write(json.dumps(entry.to_json(), separators=(",", ":")).encode() + b"\n")


def _pack_size(pack_id: str, new: dict[str, int], cache: FilesCache) -> int:
    if pack_id in new:
        return new[pack_id]
    row = cache.db.execute("SELECT size FROM packs WHERE id=?", (pack_id,)).fetchone()
    return row[0] if row else 0


def _ensure_packs_everywhere(
    packs: list[str], live: dict[str, Location], failed: dict[str, str], encrypted: bool, log: Log
) -> None:
    """Right before the commit: every pack the snapshot refers to must be on every location it
    commits to. A pack one location lacks (it was down when the pack was written) is copied from
    another; a pack no location holds (removed by a pack collection) fails the snapshot."""
    present: dict[str, set[str]] = {}
    for name, loc in list(live.items()):
        try:
            present[name] = {fmt.pack_id_of(o.key) for o in loc.list(f"{fmt.ROOT}/packs/")}
        except LocationError as e:
            failed[name] = str(e)
            del live[name]
    for pack_id in packs:
        holders = [n for n in live if pack_id in present[n]]
        if not holders:
            raise SnapshotFailed(
                f"pack {pack_id} is on no location any more (removed by retention while this snapshot ran?); "
                "nothing was committed: take the snapshot again"
            )
        for name in [n for n in live if pack_id not in present[n]]:
            key = fmt.pack_key(pack_id, encrypted)
            try:
                data = live[holders[0]].get_bytes(key)
                if hashlib.sha256(data).hexdigest() != pack_id:
                    raise LocationError(holders[0], f"pack {pack_id} fails its checksum")
                live[name].put_bytes(key, data)
                log(f"copied pack {pack_id} to {name} from {holders[0]} (it was missing there)")
            except LocationError as e:
                failed[name] = str(e)
                del live[name]


def _seal(plain: Path, sealed: Path, recipients) -> tuple[int, str]:
    with open(plain, "rb") as src, open(sealed, "wb") as dst:
        if recipients:
            pyrage.encrypt_io(src, dst, recipients)
        else:
            shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    h = hashlib.sha256()
    with open(sealed, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return sealed.stat().st_size, h.hexdigest()


def _upload_file(loc: Location, key: str, path: Path) -> None:
    up = loc.open_upload(key)
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                up.write(block)
    except BaseException:
        up.abort()
        raise
    up.commit()


def _commit(
    index: SnapshotIndex,
    chunk_list: Path,
    sealed: Path,
    live: dict[str, Location],
    failed: dict[str, str],
    encrypted: bool,
    log: Log,
) -> list[str]:
    """The chunk list, the index, then the manifest (the commit marker), on each location holding every pack."""
    committed = []
    body = index.model_dump_json().encode()
    for name, loc in live.items():
        try:
            _upload_file(loc, fmt.chunks_key(index.file_set, index.id), chunk_list)
            loc.put_bytes(fmt.index_key(index.file_set, index.id), body)
            _upload_file(loc, fmt.manifest_key(index.file_set, index.id, encrypted), sealed)
            committed.append(name)
        except LocationError as e:
            failed[name] = str(e)
    if not committed:
        raise SnapshotFailed(
            f"snapshot {index.id} of {index.file_set!r} failed on every location: "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return committed
