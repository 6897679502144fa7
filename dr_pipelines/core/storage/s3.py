"""S3 locations (multipart uploads; the client comes from dagster-aws or the config)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

from dr_pipelines.core.config import (
    S3LocationConfig,
)
from dr_pipelines.core.storage.base import (
    LocationDown,
    LocationError,
    ObjectInfo,
    ObjectLocked,
    ObjectNotFound,
    Unfinished,
    Upload,
    check_up,
    describe_error,
    mark_down,
)

# --------------------------------------------------------------------------- S3


class _S3Upload:
    """Multipart upload; a small object becomes one PUT at commit. Invisible until completed."""

    def __init__(self, location: S3Location, key: str):
        self._loc = location
        self._rel = key  # for messages (the location's url() adds the prefix)
        self._key = location.prefix + key
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None

    def _flush_part(self) -> None:
        loc = self._loc
        if self._upload_id is None:
            resp = loc._call(
                "start upload of",
                self._rel,
                loc.client.create_multipart_upload,
                Bucket=loc.bucket,
                Key=self._key,
                **loc.write_args(),
            )
            self._upload_id = resp["UploadId"]
        number = len(self._parts) + 1
        resp = loc._call(
            "upload a part of",
            self._rel,
            loc.client.upload_part,
            Bucket=loc.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=bytes(self._buf),
        )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})
        self._buf.clear()

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self._loc.chunk_size:
            self._flush_part()

    def commit(self) -> None:
        loc = self._loc
        if self._upload_id is None:
            loc._call(
                "write",
                self._rel,
                loc.client.put_object,
                Bucket=loc.bucket,
                Key=self._key,
                Body=bytes(self._buf),
                **loc.write_args(),
            )
            return
        if self._buf:
            self._flush_part()
        loc._call(
            "complete upload of",
            self._rel,
            loc.client.complete_multipart_upload,
            Bucket=loc.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        if self._upload_id is not None:
            try:
                self._loc.client.abort_multipart_upload(
                    Bucket=self._loc.bucket, Key=self._key, UploadId=self._upload_id
                )
            except Exception:
                pass  # the location is likely down; a lifecycle rule cleans abandoned uploads
            self._upload_id = None
        self._buf = bytearray()


class _Body:
    """An object's bytes as they arrive; a location that stops answering mid-read raises LocationError
    (it is not a corrupt object, and must not read like one)."""

    def __init__(self, location: S3Location, key: str, body: Any):
        self._loc, self._key, self._body = location, key, body

    def read(self, size: int = -1) -> bytes:
        try:
            return self._body.read(size if size >= 0 else None)
        except Exception as e:
            raise self._loc._error("read", self._key, e) from e

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        self.lock = cfg.object_lock

    def write_args(self) -> dict[str, Any]:
        """What every write carries: the storage class, encryption and, under Object Lock, the retention
        (from now: each object is immutable for `days` after it is written)."""
        if self.lock is None:
            return dict(self.put_args)
        from datetime import datetime, timedelta, timezone

        until = datetime.now(timezone.utc) + timedelta(days=self.lock.days)
        return {**self.put_args, "ObjectLockMode": self.lock.mode, "ObjectLockRetainUntilDate": until}

    def lock_until(self, written: datetime) -> datetime | None:
        """When an object written at `written` can be deleted (None: no lock)."""
        from datetime import timedelta

        return written + timedelta(days=self.lock.days) if self.lock else None

    def check_object_lock(self) -> None:
        """A location configured with object_lock whose bucket has no Object Lock would write objects
        anyone can delete: refused at start. A location that does not answer is checked when it does."""
        from dr_pipelines.core.config import ConfigError

        if self.lock is None:
            return
        try:
            resp = self.client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            why = "its Object Lock is not enabled"
        except Exception as e:
            code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
            if code != "ObjectLockConfigurationNotFoundError":
                return  # down, or these credentials may not read it (a restore host): the writes will tell
            enabled, why = False, "it has no Object Lock configuration"
        if not enabled:
            raise ConfigError(
                f"locations.{self.name}.object_lock: bucket {self.bucket!r} cannot lock objects ({why}). Object Lock "
                "is chosen when a bucket is created: create one with it enabled (aws s3api create-bucket "
                "--object-lock-enabled-for-bucket), or remove object_lock from this location"
            )

    def _call(self, what: str, key: str, fn, **kw):
        check_up(self.name)
        try:
            return fn(**kw)
        except Exception as e:
            raise self._error(what, key, e) from e

    def _error(self, what: str, key: str, e: Exception) -> LocationError:
        if _s3_not_found(e):
            return ObjectNotFound(self.name, f"{self.url(key)} not found")
        text = f"cannot {what} {self.url(key)}: {describe_error(e)}"
        if _unreachable(e):
            mark_down(self.name, text)
            return LocationDown(self.name, text)
        return LocationError(self.name, text)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def open_upload(self, key: str) -> Upload:
        return _S3Upload(self, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            "write",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.prefix + key,
            Body=data,
            **self.write_args(),
        )

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._call(
                "write",
                key,
                self.client.put_object,
                Bucket=self.bucket,
                Key=self.prefix + key,
                Body=data,
                IfNoneMatch="*",
                **self.write_args(),
            )
        except LocationError as e:
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as body:
            return body.read()

    def open_read(self, key: str) -> BinaryIO:
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self.prefix + key)
        return _Body(self, key, resp["Body"])  # type: ignore[return-value]

    def size(self, key: str) -> int | None:
        try:
            resp = self._call("inspect", key, self.client.head_object, Bucket=self.bucket, Key=self.prefix + key)
        except ObjectNotFound:
            return None
        return resp["ContentLength"]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_up(self.name)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix) :], obj["Size"], obj.get("LastModified"))
        except Exception as e:
            raise self._error("list", prefix, e) from e

    def delete(self, key: str) -> None:
        if self.lock is None:
            self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self.prefix + key)
            return
        # a locked bucket is versioned: a plain delete would only hide the object behind a delete marker
        # (and keep paying for it); every version goes, or the lock says when it can
        full = self.prefix + key
        pages = self._call(
            "list the versions of",
            key,
            lambda: list(self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full)),
        )
        versions = [v for page in pages for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        for v in [v for v in versions if v["Key"] == full]:
            try:
                self._call(
                    "delete", key, self.client.delete_object, Bucket=self.bucket, Key=full, VersionId=v["VersionId"]
                )
            except LocationError as e:
                if "AccessDenied" not in str(e):
                    raise
                head = self._call(
                    "inspect", key, self.client.head_object, Bucket=self.bucket, Key=full, VersionId=v["VersionId"]
                )
                until = head.get("ObjectLockRetainUntilDate")
                if until is None or until <= datetime.now(until.tzinfo):
                    raise  # not the lock: these credentials lack s3:DeleteObjectVersion, say
                raise ObjectLocked(
                    self.name,
                    f"{self.url(key)} is under object lock ({head.get('ObjectLockMode')}) until {until}: "
                    "it can be deleted after that",
                ) from None

    def unfinished(self, prefix: str = "") -> Iterator[Unfinished]:
        """Multipart uploads never completed nor aborted (billed by S3 until they are)."""
        check_up(self.name)
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    yield Unfinished(
                        up["Key"][len(self.prefix) :], up.get("Initiated"), None, "multipart upload", up["UploadId"]
                    )
        except Exception as e:
            raise self._error("list the unfinished uploads of", prefix, e) from e

    def discard(self, item: Unfinished) -> None:
        self._call(
            "abort the upload of",
            item.key,
            self.client.abort_multipart_upload,
            Bucket=self.bucket,
            Key=self.prefix + item.key,
            UploadId=item.ref,
        )

    def get_storage_class(self, key: str) -> str:
        resp = self._call("inspect", key, self.client.head_object, Bucket=self.bucket, Key=self.prefix + key)
        return resp.get("StorageClass", "STANDARD")

    def set_storage_class(self, key: str, storage_class: str) -> None:
        """Copy the object onto itself in the new class (boto3's managed copy: multipart when large)."""
        extra = {**self.write_args(), "StorageClass": storage_class, "MetadataDirective": "COPY"}
        self._call(
            "change the storage class of",
            key,
            self.client.copy,
            CopySource={"Bucket": self.bucket, "Key": self.prefix + key},
            Bucket=self.bucket,
            Key=self.prefix + key,
            ExtraArgs=extra,
        )


def _s3_not_found(exc: Exception) -> bool:
    # a timeout or a dropped connection has no response (None): not "not found", the location is down
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("NoSuchKey", "404", "NotFound")


# --------------------------------------------------------------------------- clients from config


def s3_client(name: str, cfg: S3LocationConfig, credentials: dict[str, str] | None = None):
    """A boto3 client with the location's timeouts; credentials from dagster-aws's S3Resource in the
    Dagster layer, else from the variables the config names (or boto3's own chain)."""
    import boto3
    from botocore.config import Config

    connect = cfg.connect_timeout.total_seconds()
    attempts = max(1, round(cfg.retry_for.total_seconds() / max(connect, 1.0)))
    return boto3.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        config=Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect,
            read_timeout=cfg.read_timeout.total_seconds(),
        ),
        **(credentials if credentials is not None else cfg.credentials(name)),
    )


def _unreachable(e: Exception) -> bool:
    """No answer at all (refused, timed out, dropped): the location is down, not the request wrong."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(e, (BotoConnectionError, HTTPClientError))
