"""The protocol every location implements (local disk, S3, GCS), and its errors."""

from __future__ import annotations

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


class ObjectNotFound(LocationError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None = None  # when the object was written (UTC), as the listing reports it


class Upload(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Location(Protocol):
    name: str

    def url(self, key: str = "") -> str: ...
    def open_upload(self, key: str) -> Upload: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...


@runtime_checkable
class TieredLocation(Location, Protocol):
    """A location with storage classes (S3, GCS): retention moves old keepers to colder ones."""

    def get_storage_class(self, key: str) -> str: ...
    def set_storage_class(self, key: str, storage_class: str) -> None: ...


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:500] + "..."
