"""Google Cloud Storage locations (resumable uploads; the client comes from dagster-gcp or the config)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, BinaryIO

from dr_pipelines.core.config import (
    GCSLocationConfig,
)
from dr_pipelines.core.storage.base import (
    LocationDown,
    LocationError,
    ObjectInfo,
    ObjectNotFound,
    Unfinished,
    Upload,
    check_up,
    describe_error,
    mark_down,
)

# --------------------------------------------------------------------------- GCS


class _GCSUpload:
    """Resumable upload; the object appears only when the upload is finalized at commit."""

    def __init__(self, location: GCSLocation, key: str):
        self._loc = location
        self._key = key
        blob = location.bucket.blob(key)
        if location.storage_class:
            blob.storage_class = location.storage_class
        self._writer = blob.open(
            "wb", chunk_size=location.chunk_size, ignore_flush=True, retry=location.retry, timeout=location.timeout
        )

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except Exception as e:
            raise self._loc._err("upload", self._key, e, prefixed=True) from e

    def commit(self) -> None:
        try:
            self._writer.close()
        except Exception as e:
            raise self._loc._err("finish", self._key, e, prefixed=True) from e

    def abort(self) -> None:
        """Cancel the resumable session, so nothing is finalized: not now, and not when the writer is
        garbage-collected (a dropped BlobWriter closes, which would finalize a partial object)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.terminate()
        except Exception:  # GCS unreachable: the session expires on its own; never finalize it
            try:
                writer._buffer.close()
            except Exception:
                pass


class _Reader:
    """A blob's bytes as they arrive; GCS going away mid-read raises LocationError, not corruption."""

    def __init__(self, location: GCSLocation, key: str, reader: Any):
        self._loc, self._key, self._reader = location, key, reader

    def read(self, size: int = -1) -> bytes:
        try:
            return self._reader.read(size)
        except Exception as e:
            raise self._loc._err("read", self._key, e) from e

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GCSLocation:
    def __init__(self, name: str, cfg: GCSLocationConfig, client: Any):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.name = name
        self.client = client
        # every call: these timeouts, and retries for at most retry_for (the library's default is 120 s)
        self.timeout = (cfg.connect_timeout.total_seconds(), cfg.read_timeout.total_seconds())
        self.retry = DEFAULT_RETRY.with_deadline(cfg.retry_for.total_seconds()).with_timeout(
            cfg.retry_for.total_seconds()
        )
        self.bucket = client.bucket(cfg.bucket)
        self.bucket_name = cfg.bucket
        self.prefix = cfg.prefix
        self.storage_class = cfg.storage_class
        self.chunk_size = cfg.chunk_mb << 20
        self.retention_days = cfg.retention_days

    def lock_until(self, written: datetime) -> datetime | None:
        """When an object written at `written` can be deleted under the bucket's retention policy."""
        return written + timedelta(days=self.retention_days) if self.retention_days else None

    def ensure_retention_policy(self) -> int | None:
        """Set the bucket's retention policy to retention_days and read it back (the seconds GCS holds).
        A location that does not answer is left for later. (The GCS emulator stores the policy but does
        not enforce it: only real GCS refuses an early delete.)"""
        from dr_pipelines.core.config import ConfigError

        if not self.retention_days:
            return None
        want = self.retention_days * 86400
        try:
            self.bucket.reload(timeout=self.timeout, retry=self.retry)
            if self.bucket.retention_period != want:
                if self.bucket.retention_policy_locked:
                    raise ConfigError(
                        f"locations.{self.name}.retention_days: bucket {self.bucket_name!r} has a locked retention "
                        f"policy of {self.bucket.retention_period} s, which cannot change; set retention_days to match"
                    )
                self.bucket.retention_period = want
                self.bucket.patch(timeout=self.timeout, retry=self.retry)
                self.bucket.reload(timeout=self.timeout, retry=self.retry)
        except ConfigError:
            raise
        except Exception as e:
            if _unreachable(e):
                return None
            raise ConfigError(
                f"locations.{self.name}.retention_days: cannot set the retention policy of bucket "
                f"{self.bucket_name!r}: {describe_error(e)} (the backup host needs storage.buckets.update once, "
                "or set the policy yourself)"
            ) from None
        if self.bucket.retention_period != want:
            raise ConfigError(
                f"locations.{self.name}.retention_days: bucket {self.bucket_name!r} reports a retention period of "
                f"{self.bucket.retention_period} s after it was set to {want} s"
            )
        return want

    def url(self, key: str = "") -> str:
        return f"gs://{self.bucket_name}/{self.prefix}{key}"

    def _err(self, what: str, key: str, e: Exception, prefixed: bool = False) -> LocationError:
        """`key` is relative to the prefix unless `prefixed` (an upload's full name)."""
        from google.api_core.exceptions import NotFound

        url = f"gs://{self.bucket_name}/{key}" if prefixed else self.url(key)
        if isinstance(e, NotFound):
            return ObjectNotFound(self.name, f"{url} not found")
        text = f"cannot {what} {url}: {describe_error(e)}"
        if _unreachable(e):
            mark_down(self.name, text)
            return LocationDown(self.name, text)
        return LocationError(self.name, text)

    def _call(self, what: str, key: str, fn, *args, **kw):
        check_up(self.name)
        try:
            return fn(*args, timeout=self.timeout, retry=self.retry, **kw)
        except Exception as e:
            raise self._err(what, key, e) from e

    def open_upload(self, key: str) -> Upload:
        check_up(self.name)
        try:
            return _GCSUpload(self, self.prefix + key)
        except Exception as e:
            raise self._err("start upload of", key, e) from e

    def put_bytes(self, key: str, data: bytes) -> None:
        blob = self.bucket.blob(self.prefix + key)
        if self.storage_class:
            blob.storage_class = self.storage_class
        self._call("write", key, blob.upload_from_string, data, content_type="application/octet-stream")

    def create(self, key: str, data: bytes) -> bool:
        """if_generation_match=0: only if absent (real GCS; the emulator ignores the condition)."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self.prefix + key)
        if self.storage_class:
            blob.storage_class = self.storage_class
        try:
            self._call(
                "write",
                key,
                blob.upload_from_string,
                data,
                content_type="application/octet-stream",
                if_generation_match=0,
            )
        except LocationError as e:
            if isinstance(e.__cause__, PreconditionFailed):
                return False
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        return self._call("read", key, self.bucket.blob(self.prefix + key).download_as_bytes)

    def open_read(self, key: str) -> BinaryIO:
        blob = self._call("read", key, self.bucket.get_blob, self.prefix + key)
        if blob is None:
            raise ObjectNotFound(self.name, f"{self.url(key)} not found")
        return _Reader(
            self,
            key,
            blob.open(
                "rb",
                chunk_size=self.chunk_size,
                retry=self.retry,  # type: ignore[return-value]
                timeout=self.timeout,
            ),
        )

    def size(self, key: str) -> int | None:
        blob = self._call("inspect", key, self.bucket.get_blob, self.prefix + key)
        return None if blob is None else blob.size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_up(self.name)
        try:
            blobs = self.client.list_blobs(
                self.bucket_name, prefix=self.prefix + prefix, timeout=self.timeout, retry=self.retry
            )
            for blob in blobs:
                yield ObjectInfo(blob.name[len(self.prefix) :], blob.size, blob.updated)
        except Exception as e:
            raise self._err("list", prefix, e) from e

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.bucket.blob(self.prefix + key).delete)
        except ObjectNotFound:
            pass

    def unfinished(self, prefix: str = "") -> Iterator[Unfinished]:
        """None to find: an unfinished resumable upload is invisible, costs nothing and expires."""
        return iter(())

    def discard(self, item: Unfinished) -> None:
        pass

    def get_storage_class(self, key: str) -> str:
        blob = self._call("inspect", key, self.bucket.get_blob, self.prefix + key)
        if blob is None:
            raise ObjectNotFound(self.name, f"{self.url(key)} not found")
        return blob.storage_class or "STANDARD"

    def set_storage_class(self, key: str, storage_class: str) -> None:
        self._call(
            "change the storage class of", key, self.bucket.blob(self.prefix + key).update_storage_class, storage_class
        )


def _unreachable(e: Exception) -> bool:
    """No answer at all, or none within retry_for: the location is down."""
    import requests
    from google.api_core.exceptions import RetryError, ServiceUnavailable

    return isinstance(
        e,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            RetryError,
            ServiceUnavailable,
            ConnectionError,
            TimeoutError,
        ),
    )


def gcs_client(cfg: GCSLocationConfig):
    """A google-cloud-storage client; the emulator is reached through STORAGE_EMULATOR_HOST."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=cfg.project or "emulator", credentials=AnonymousCredentials())
    return storage.Client(project=cfg.project)
