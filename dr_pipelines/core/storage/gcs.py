"""Google Cloud Storage locations (resumable uploads; the client comes from dagster-gcp or the config)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from dr_pipelines.core.config import (
    GCSLocationConfig,
)
from dr_pipelines.core.storage.base import (
    LocationError,
    ObjectInfo,
    ObjectNotFound,
    Upload,
    describe_error,
)

# --------------------------------------------------------------------------- GCS


class _GCSUpload:
    """Resumable upload; the object appears only when the upload is finalized at commit."""

    def __init__(self, location: GCSLocation, key: str):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self._loc = location
        self._key = key
        blob = location.bucket.blob(key)
        if location.storage_class:
            blob.storage_class = location.storage_class
        self._writer = blob.open("wb", chunk_size=location.chunk_size, ignore_flush=True, retry=DEFAULT_RETRY)

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except Exception as e:
            raise LocationError(self._loc.name, f"cannot upload {self._loc.url(self._key)}: {describe_error(e)}") from e

    def commit(self) -> None:
        try:
            self._writer.close()
        except Exception as e:
            raise LocationError(self._loc.name, f"cannot finish {self._loc.url(self._key)}: {describe_error(e)}") from e

    def abort(self) -> None:
        # A dropped BlobWriter finalizes itself when garbage-collected (io objects close in
        # __del__), so an abandoned upload would appear: finish it, then delete what it made.
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception:
            pass  # GCS is unreachable: the unfinished session expires on its own
        try:
            self._loc.bucket.blob(self._key).delete()
        except Exception:
            pass


class GCSLocation:
    def __init__(self, name: str, cfg: GCSLocationConfig, client: Any):
        self.name = name
        self.client = client
        self.bucket = client.bucket(cfg.bucket)
        self.bucket_name = cfg.bucket
        self.prefix = cfg.prefix
        self.storage_class = cfg.storage_class
        self.chunk_size = cfg.chunk_mb << 20

    def url(self, key: str = "") -> str:
        return f"gs://{self.bucket_name}/{self.prefix}{key}"

    def _err(self, what: str, key: str, e: Exception) -> LocationError:
        from google.api_core.exceptions import NotFound

        if isinstance(e, NotFound):
            return ObjectNotFound(self.name, f"{self.url(key)} not found")
        return LocationError(self.name, f"cannot {what} {self.url(key)}: {describe_error(e)}")

    def open_upload(self, key: str) -> Upload:
        try:
            return _GCSUpload(self, self.prefix + key)
        except Exception as e:
            raise self._err("start upload of", key, e) from e

    def put_bytes(self, key: str, data: bytes) -> None:
        blob = self.bucket.blob(self.prefix + key)
        if self.storage_class:
            blob.storage_class = self.storage_class
        try:
            blob.upload_from_string(data, content_type="application/octet-stream")
        except Exception as e:
            raise self._err("write", key, e) from e

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.bucket.blob(self.prefix + key).download_as_bytes()
        except Exception as e:
            raise self._err("read", key, e) from e

    def open_read(self, key: str) -> BinaryIO:
        try:
            blob = self.bucket.get_blob(self.prefix + key)
        except Exception as e:
            raise self._err("read", key, e) from e
        if blob is None:
            raise ObjectNotFound(self.name, f"{self.url(key)} not found")
        return blob.open("rb", chunk_size=self.chunk_size)

    def size(self, key: str) -> int | None:
        try:
            blob = self.bucket.get_blob(self.prefix + key)
        except Exception as e:
            raise self._err("inspect", key, e) from e
        return None if blob is None else blob.size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            for blob in self.client.list_blobs(self.bucket_name, prefix=self.prefix + prefix):
                yield ObjectInfo(blob.name[len(self.prefix) :], blob.size, blob.updated)
        except Exception as e:
            raise self._err("list", prefix, e) from e

    def delete(self, key: str) -> None:
        try:
            self.bucket.blob(self.prefix + key).delete()
        except Exception as e:
            err = self._err("delete", key, e)
            if not isinstance(err, ObjectNotFound):
                raise err from e

    def get_storage_class(self, key: str) -> str:
        try:
            blob = self.bucket.get_blob(self.prefix + key)
        except Exception as e:
            raise self._err("inspect", key, e) from e
        if blob is None:
            raise ObjectNotFound(self.name, f"{self.url(key)} not found")
        return blob.storage_class or "STANDARD"

    def set_storage_class(self, key: str, storage_class: str) -> None:
        try:
            self.bucket.blob(self.prefix + key).update_storage_class(storage_class)
        except Exception as e:
            raise self._err("change the storage class of", key, e) from e


def gcs_client(cfg: GCSLocationConfig):
    """A google-cloud-storage client; the emulator is reached through STORAGE_EMULATOR_HOST."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=cfg.project or "emulator", credentials=AnonymousCredentials())
    return storage.Client(project=cfg.project)
