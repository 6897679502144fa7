"""The backup host's local cache (SQLite, on disk, so memory stays flat however large the tree).

- `files`: path -> (size, mtime, ctime, inode) and the chunks it was cut into: an unchanged file
  costs one stat. The host cannot read old manifests (only the identity can), so this is what
  makes a snapshot incremental.
- `chunks`: the chunk ids the repository holds, and their pack, read from the snapshots' plaintext
  indexes. With this, content already stored is never uploaded again, even across file sets.

Losing the cache costs a re-read of every file, never a re-upload: the chunk table is rebuilt from
the repository's indexes. Nothing here is trusted blindly: a cached file is reused only when every
one of its chunks is in a pack the repository still lists.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    file_set TEXT, path BLOB, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER,
    key_id TEXT, sha256 TEXT, chunks BLOB, PRIMARY KEY (file_set, path));
CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, pack TEXT, key_id TEXT);
CREATE TABLE IF NOT EXISTS packs (id TEXT PRIMARY KEY, size INTEGER);
CREATE TABLE IF NOT EXISTS indexes (key TEXT PRIMARY KEY);
"""


def _pack_chunks(chunks: list[tuple[bytes, int]]) -> bytes:
    return b"".join(c + n.to_bytes(4, "big") for c, n in chunks)


def _unpack_chunks(blob: bytes) -> list[tuple[bytes, int]]:
    return [(blob[i : i + 32], int.from_bytes(blob[i + 32 : i + 36], "big")) for i in range(0, len(blob), 36)]


class FilesCache:
    def __init__(self, state_dir: Path, repository: str):
        """One cache per repository (named by its locations), in the host's state directory."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.name = hashlib.sha256(repository.encode()).hexdigest()[:16]
        self.path = state_dir / f"files-cache-{self.name}.sqlite"
        try:
            self.db = self._open()
        except sqlite3.OperationalError:
            raise  # busy beyond the timeout: another snapshot holds it; a real error, not damage
        except sqlite3.DatabaseError:  # a damaged cache is only a cache
            self.path.unlink(missing_ok=True)
            self.db = self._open()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")  # a cache: a crash may lose it, which costs a re-read

    def _open(self) -> sqlite3.Connection:
        # several snapshots (of one set or several) may run at once: each waits its turn to write,
        # and none holds a write for more than a moment (commits are frequent)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=300)
        db.executescript(_SCHEMA)
        return db

    def close(self) -> None:
        self.commit()
        self.db.close()

    # -- what the repository holds

    def adopt_journals(self, tmp_dir: Path, log) -> None:
        """Packs a killed run stored (its journal says which chunks each holds): known from now on,
        so the next run reuses them instead of uploading their content again."""
        import json

        from dr_pipelines.core.owner import owner_dead

        for journal in sorted(tmp_dir.glob(f"packs-{self.name}-*")):
            owner = journal.name.split(".", 1)[1].rsplit(".", 1)[0].replace("+", ":")
            if not owner_dead(owner):
                continue  # a run in progress (or another host's): not ours to take
            packs = 0
            for line in journal.read_text().splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue  # the last line, cut by the kill
                self.add_chunks(item["pack"], item["key_id"], [bytes.fromhex(c) for c in item["chunks"]])
                packs += 1
            journal.unlink()
            log(f"a killed snapshot stored {packs} packs: their chunks are reused")

    def seen_index(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM indexes WHERE key=?", (key,)).fetchone() is not None

    def add_index(self, key: str, key_id: str, packs: list[str], chunks: list[tuple[bytes, int]]) -> None:
        """Chunk ids of one snapshot's index (chunk, position of its pack in `packs`)."""
        self.commit()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(
            "INSERT OR IGNORE INTO chunks(id, pack, key_id) VALUES (?, ?, ?)",
            ((c, packs[i], key_id) for c, i in chunks),
        )
        self.db.execute("INSERT OR IGNORE INTO indexes(key) VALUES (?)", (key,))
        self.db.execute("COMMIT")

    def set_packs(self, packs: dict[str, int]) -> None:
        """The packs the repository lists now; chunks in packs gone (retention) are forgotten."""
        self.commit()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM packs")
        self.db.executemany("INSERT INTO packs(id, size) VALUES (?, ?)", packs.items())
        self.db.execute("DELETE FROM chunks WHERE pack NOT IN (SELECT id FROM packs)")
        self.db.execute("COMMIT")

    def pack_of(self, chunk_id: bytes, key_id: str) -> str | None:
        row = self.db.execute("SELECT pack FROM chunks WHERE id=? AND key_id=?", (chunk_id, key_id)).fetchone()
        return row[0] if row else None

    _writes, _since = 0, 0.0

    def add_chunks(self, pack: str, key_id: str, chunk_ids: list[bytes]) -> None:
        """A stored pack's chunks: committed at once, so a run killed later still knows them (its
        packs are reused by the next run, not uploaded again)."""
        self.db.executemany(
            "INSERT OR REPLACE INTO chunks(id, pack, key_id) VALUES (?, ?, ?)", ((c, pack, key_id) for c in chunk_ids)
        )
        if self.db.in_transaction:
            self.db.execute("COMMIT")
            self.begin()

    # -- what the tree held

    def lookup(
        self, file_set: str, path: bytes, size: int, mtime_ns: int, ctime_ns: int, ino: int, key_id: str
    ) -> tuple[str, list[tuple[bytes, int]]] | None:
        row = self.db.execute(
            "SELECT sha256, chunks FROM files WHERE file_set=? AND path=? AND size=? AND mtime_ns=? "
            "AND ctime_ns=? AND ino=? AND key_id=?",
            (file_set, path, size, mtime_ns, ctime_ns, ino, key_id),
        ).fetchone()
        if row is None:
            return None
        return row[0], _unpack_chunks(row[1])

    def has_path(self, file_set: str, path: bytes) -> bool:
        return (
            self.db.execute("SELECT 1 FROM files WHERE file_set=? AND path=?", (file_set, path)).fetchone() is not None
        )

    def begin(self) -> None:
        """Group the writes of a run in transactions (one commit per many files, not one per file)."""
        self.db.execute("BEGIN IMMEDIATE")
        self._writes, self._since = 0, time.monotonic()

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def remember(
        self,
        file_set: str,
        path: bytes,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        ino: int,
        key_id: str,
        sha256: str,
        chunks: list[tuple[bytes, int]],
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (file_set, path, size, mtime_ns, ctime_ns, ino, key_id, sha256, _pack_chunks(chunks)),
        )
        if self.db.in_transaction:
            self._writes += 1
            # a kill loses at most these entries (a re-read, no more); another snapshot waits at most this
            if self._writes >= 2000 or time.monotonic() - self._since > 1.0:
                self.db.execute("COMMIT")
                self.begin()
