"""Backup locations: local disk, S3 and GCS behind one small interface.

Keys are relative ("app/logical/<id>/manifest.json"); each location adds its own root or prefix.
Writes are atomic: a local object appears only after temp + fsync + rename + directory fsync; a
remote one only when its multipart (S3) or resumable (GCS) upload completes. Clients (boto3,
google-cloud-storage) are passed in: the Dagster layer takes them from dagster-aws / dagster-gcp,
the command line builds them from the config.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Protocol

from dr_pipelines.core.config import GCSLocationConfig, LocalLocationConfig, S3LocationConfig
from dr_pipelines.core.durable import fsync_dir


class LocationError(RuntimeError):
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


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:500] + "..."


# --------------------------------------------------------------------------- local


class _LocalUpload:
    def __init__(self, location: "LocalLocation", path: Path):
        self._location = location
        self._path = path
        # directories made here must themselves be durable: fsync each one's parent at commit
        self._new_dirs = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        self._file = open(self._tmp, "xb")

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
    def from_config(cls, name: str, cfg: LocalLocationConfig, base_dir: Path) -> "LocalLocation":
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
        start = self.root / prefix if prefix and (self.root / prefix).is_dir() else self.root
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
        self._path(key).unlink(missing_ok=True)


# --------------------------------------------------------------------------- S3


class _S3Upload:
    """Multipart upload; a small object becomes one PUT at commit. Invisible until completed."""

    def __init__(self, location: "S3Location", key: str):
        self._loc = location
        self._key = key
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None

    def _flush_part(self) -> None:
        loc = self._loc
        if self._upload_id is None:
            resp = loc._call("start upload of", self._key, loc.client.create_multipart_upload,
                             Bucket=loc.bucket, Key=self._key, **loc.put_args)
            self._upload_id = resp["UploadId"]
        number = len(self._parts) + 1
        resp = loc._call("upload a part of", self._key, loc.client.upload_part, Bucket=loc.bucket,
                         Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=bytes(self._buf))
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})
        self._buf.clear()

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self._loc.chunk_size:
            self._flush_part()

    def commit(self) -> None:
        loc = self._loc
        if self._upload_id is None:
            loc._call("write", self._key, loc.client.put_object, Bucket=loc.bucket, Key=self._key,
                      Body=bytes(self._buf), **loc.put_args)
            return
        if self._buf:
            self._flush_part()
        loc._call("complete upload of", self._key, loc.client.complete_multipart_upload,
                  Bucket=loc.bucket, Key=self._key, UploadId=self._upload_id,
                  MultipartUpload={"Parts": self._parts})

    def abort(self) -> None:
        if self._upload_id is not None:
            try:
                self._loc.client.abort_multipart_upload(
                    Bucket=self._loc.bucket, Key=self._key, UploadId=self._upload_id)
            except Exception:
                pass  # the location is likely down; a lifecycle rule cleans abandoned uploads
            self._upload_id = None
        self._buf = bytearray()


class S3Location:
    def __init__(self, name: str, cfg: S3LocationConfig, client: Any):
        self.name = name
        self.client = client
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.chunk_size = cfg.multipart_chunk_mb << 20
        self.put_args: dict[str, str] = {"StorageClass": cfg.storage_class}
        if cfg.sse and cfg.sse != "none":
            self.put_args["ServerSideEncryption"] = cfg.sse
            if cfg.sse == "aws:kms" and cfg.sse_kms_key_id:
                self.put_args["SSEKMSKeyId"] = cfg.sse_kms_key_id

    def _call(self, what: str, key: str, fn, **kw):
        try:
            return fn(**kw)
        except Exception as e:
            if _s3_not_found(e):
                raise ObjectNotFound(self.name, f"{self.url(key)} not found") from e
            raise LocationError(self.name, f"cannot {what} {self.url(key)}: {_describe(e)}") from e

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def open_upload(self, key: str) -> Upload:
        return _S3Upload(self, self.prefix + key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self.prefix + key,
                   Body=data, **self.put_args)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as body:
            return body.read()

    def open_read(self, key: str) -> BinaryIO:
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self.prefix + key)
        return resp["Body"]

    def size(self, key: str) -> int | None:
        try:
            resp = self._call("inspect", key, self.client.head_object, Bucket=self.bucket,
                              Key=self.prefix + key)
        except ObjectNotFound:
            return None
        return resp["ContentLength"]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj.get("LastModified"))
        except Exception as e:
            raise LocationError(self.name, f"cannot list {self.url(prefix)}: {_describe(e)}") from e

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self.prefix + key)

    def get_storage_class(self, key: str) -> str:
        resp = self._call("inspect", key, self.client.head_object, Bucket=self.bucket, Key=self.prefix + key)
        return resp.get("StorageClass", "STANDARD")

    def set_storage_class(self, key: str, storage_class: str) -> None:
        """Copy the object onto itself in the new class (boto3's managed copy: multipart when large)."""
        extra = {**self.put_args, "StorageClass": storage_class, "MetadataDirective": "COPY"}
        self._call("change the storage class of", key, self.client.copy,
                   CopySource={"Bucket": self.bucket, "Key": self.prefix + key},
                   Bucket=self.bucket, Key=self.prefix + key, ExtraArgs=extra)


def _s3_not_found(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in ("NoSuchKey", "404", "NotFound")


# --------------------------------------------------------------------------- GCS


class _GCSUpload:
    """Resumable upload; the object appears only when the upload is finalized at commit."""

    def __init__(self, location: "GCSLocation", key: str):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self._loc = location
        self._key = key
        blob = location.bucket.blob(key)
        if location.storage_class:
            blob.storage_class = location.storage_class
        self._writer = blob.open("wb", chunk_size=location.chunk_size, ignore_flush=True,
                                 retry=DEFAULT_RETRY)

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except Exception as e:
            raise LocationError(self._loc.name, f"cannot upload {self._loc.url(self._key)}: {_describe(e)}") from e

    def commit(self) -> None:
        try:
            self._writer.close()
        except Exception as e:
            raise LocationError(self._loc.name, f"cannot finish {self._loc.url(self._key)}: {_describe(e)}") from e

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
        return LocationError(self.name, f"cannot {what} {self.url(key)}: {_describe(e)}")

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
                yield ObjectInfo(blob.name[len(self.prefix):], blob.size, blob.updated)
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


# --------------------------------------------------------------------------- clients from config


def s3_client(name: str, cfg: S3LocationConfig):
    """A boto3 client for the command line (the Dagster layer uses dagster-aws's S3Resource)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        **cfg.credentials(name),
    )


def gcs_client(cfg: GCSLocationConfig):
    """A google-cloud-storage client; the emulator is reached through STORAGE_EMULATOR_HOST."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=cfg.project or "emulator", credentials=AnonymousCredentials())
    return storage.Client(project=cfg.project)


def open_location(name: str, cfg, base_dir: Path, client: Any = None) -> Location:
    if isinstance(cfg, LocalLocationConfig):
        return LocalLocation.from_config(name, cfg, base_dir)
    if isinstance(cfg, S3LocationConfig):
        return S3Location(name, cfg, client or s3_client(name, cfg))
    if isinstance(cfg, GCSLocationConfig):
        return GCSLocation(name, cfg, client or gcs_client(cfg))
    raise TypeError(f"unknown location config {cfg!r}")


def open_locations(config, only: str | None = None, clients: dict[str, Any] | None = None) -> dict[str, Location]:
    """Locations in the config's order (its order of preference for restores)."""
    clients = clients or {}
    return {
        name: open_location(name, config.locations[name], config.base_dir, clients.get(name))
        for name in config.location_names(only)
    }
