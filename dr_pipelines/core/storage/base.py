"""The protocol every location implements (local disk, S3, GCS), and its errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol, runtime_checkable

from dr_pipelines.core.errors import DrError


class LocationError(DrError):
    """A location could not be read or written; the message names the location."""

    def __init__(self, location: str, message: str):
        super().__init__(f"location {location!r}: {message}")
        self.location = location


class ObjectLocked(LocationError):
    """Immutable storage refused a delete: the object's retention has not expired."""


class ObjectNotFound(LocationError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None = None  # when the object was written (UTC), as the listing reports it


@dataclass(frozen=True)
class Unfinished:
    """An upload that never completed (a temp file, an S3 multipart upload): invisible to listings,
    but it takes space (and S3 bills it) until it is discarded."""

    key: str
    started: datetime | None
    owner: str | None  # host:pid of the process that made it, where the location can tell
    what: str
    ref: str = ""  # the location's own handle (an upload id)


class Upload(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Location(Protocol):
    name: str

    def url(self, key: str = "") -> str: ...
    def open_upload(self, key: str) -> Upload: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet, atomically (the commit marker of a WAL file:
        two writers racing, one wins); False if it existed."""
        ...

    def get_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def unfinished(self, prefix: str = "") -> Iterator[Unfinished]: ...
    def discard(self, item: Unfinished) -> None: ...


@runtime_checkable
class TieredLocation(Location, Protocol):
    """A location with storage classes (S3, GCS): retention moves old keepers to colder ones."""

    def get_storage_class(self, key: str) -> str: ...
    def set_storage_class(self, key: str, storage_class: str) -> None: ...


# Locations found down in this process, by name: skipped until the time given (the rest of a run),
# so a dead location costs one timeout per run, not one per object. In-memory on purpose: a new
# process (the next run) tries again.
DOWN_FOR = 300.0
_down: dict[str, tuple[float, str]] = {}


def mark_down(name: str, reason: str) -> None:
    _down[name] = (time.monotonic() + DOWN_FOR, reason)


def forget_down(name: str | None = None) -> None:
    """Try every location again (a new run; the tests, between tests), or just `name` (a
    long-running process retrying the one location it found down)."""
    if name is None:
        _down.clear()
    else:
        _down.pop(name, None)


def check_up(name: str) -> None:
    """Raise LocationDown at once for a location found down earlier in this run."""
    entry = _down.get(name)
    if entry is None:
        return
    until, reason = entry
    if time.monotonic() > until:
        del _down[name]
        return
    raise LocationDown(name, f"skipped: down since earlier in this run ({reason})")


class LocationDown(LocationError):
    """The location did not answer within its timeouts and retries (the rest of the run skips it)."""


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:500] + "..."
