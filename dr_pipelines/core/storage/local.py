"""Local-disk locations: temp file + fsync + rename, so an object is whole or absent."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from dr_pipelines.core.config import (
    LocalLocationConfig,
)
from dr_pipelines.core.durable import fsync_dir
from dr_pipelines.core.storage.base import (
    LocationError,
    ObjectInfo,
    ObjectNotFound,
    Unfinished,
    Upload,
)

TEMP = ".tmp-"  # .<name>.tmp-<pid>@<host>.<random>: an upload in progress, or one whose process died


class _LocalUpload:
    def __init__(self, location: LocalLocation, path: Path):
        self._location = location
        self._path = path
        # directories made here must themselves be durable: fsync each one's parent at commit
        self._new_dirs = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f".{path.name}{TEMP}{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}")
        self._file = open(self._tmp, "xb")  # noqa: SIM115 -- closed by commit() or abort()

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self._tmp, self._path)
            fsync_dir(self._path.parent)
            for d in self._new_dirs:
                fsync_dir(d.parent)
        except OSError as e:
            self.abort()
            raise LocationError(self._location.name, f"cannot write {self._path}: {e}") from e

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class LocalLocation:
    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = Path(root)

    @classmethod
    def from_config(cls, name: str, cfg: LocalLocationConfig, base_dir: Path) -> LocalLocation:
        return cls(name, cfg.resolved_path(base_dir))

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad object key {key!r}")
        return self.root / key

    def url(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def open_upload(self, key: str) -> Upload:
        try:
            return _LocalUpload(self, self._path(key))
        except OSError as e:
            raise LocationError(self.name, f"cannot write under {self.root}: {e}") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        up = self.open_upload(key)
        try:
            up.write(data)
        except OSError as e:
            up.abort()
            raise LocationError(self.name, f"cannot write {key}: {e}") from e
        up.commit()

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            up = _LocalUpload(self, path)
        except OSError as e:
            raise LocationError(self.name, f"cannot write under {self.root}: {e}") from e
        try:
            up.write(data)
            up._file.flush()
            os.fsync(up._file.fileno())
            up._file.close()
            os.link(up._tmp, path)  # fails if the name exists: an exclusive create, whole or absent
            fsync_dir(path.parent)
            for d in up._new_dirs:  # a directory made here must itself be durable
                fsync_dir(d.parent)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise LocationError(self.name, f"cannot write {path}: {e}") from e
        finally:
            up.abort()  # the temp name goes; the linked name stays

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(self.name, f"{key} not found under {self.root}") from None
        except OSError as e:
            raise LocationError(self.name, f"cannot read {key}: {e}") from e

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.exists():
            return
        # the deepest directory that can hold the prefix's keys (not the whole repository)
        target = self.root / prefix if prefix else self.root
        start = target if target.is_dir() else target.parent
        if not start.is_dir() or (start != self.root and self.root not in start.parents):
            return
        for dirpath, _dirs, files in os.walk(start):
            for f in files:
                if f.startswith("."):
                    continue  # temp files of uploads in progress
                p = Path(dirpath) / f
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        st = p.stat()
                        yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))
                    except FileNotFoundError:
                        continue

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove directories left empty (a removed backup's), up to the location's root."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty, or gone
            directory = directory.parent

    def unfinished(self, prefix: str = "") -> Iterator[Unfinished]:
        """Temp files of uploads that never committed (named after the process that wrote them)."""
        start = self.root / prefix if prefix and (self.root / prefix).is_dir() else self.root
        if not start.exists():
            return
        for dirpath, _dirs, files in os.walk(start):
            for f in files:
                if f.startswith(".") and TEMP in f:
                    p = Path(dirpath) / f
                    pid, _, rest = f.rsplit(TEMP, 1)[1].partition("@")
                    host = rest.rsplit(".", 1)[0] if rest else None
                    try:
                        started = datetime.fromtimestamp(p.stat().st_mtime, timezone.utc)
                    except FileNotFoundError:
                        continue
                    owner = f"{host}:{pid}" if host else None
                    yield Unfinished(p.relative_to(self.root).as_posix(), started, owner, "temp file")

    def discard(self, item: Unfinished) -> None:
        self.delete(item.key)
