"""Every location type against its real server: atomic uploads, listing, reading, errors."""

import time

import pytest

from dr_pipelines.core.config import GCSLocationConfig, S3LocationConfig
from dr_pipelines.core.storage.base import LocationDown, ObjectNotFound, forget_down
from dr_pipelines.core.storage.local import LocalLocation
from dr_pipelines.core.storage.locations import open_location
from dr_pipelines_tests.support.configs import gcs_location, s3_location


@pytest.fixture(params=["local", "s3", "gcs"])
def location(request, tmp_path):
    if request.param == "local":
        return LocalLocation("local", tmp_path / "repo")
    if request.param == "s3":
        server = request.getfixturevalue("s3")
        return open_location("s3", S3LocationConfig(**s3_location(server)), tmp_path)
    request.getfixturevalue("gcs")
    return open_location("gcs", GCSLocationConfig(**gcs_location()), tmp_path)


def test_upload_is_invisible_until_commit(location):
    up = location.open_upload("db/logical/x/obj")
    payload = bytes(range(256)) * 40000  # ~10 MB: several S3 parts, several GCS chunks
    for i in range(0, len(payload), 1 << 20):
        up.write(payload[i : i + (1 << 20)])
    assert [o.key for o in location.list("db/")] == []
    up.commit()
    assert [(o.key, o.size) for o in location.list("db/")] == [("db/logical/x/obj", len(payload))]
    assert location.get_bytes("db/logical/x/obj") == payload
    assert location.size("db/logical/x/obj") == len(payload)


def test_aborted_upload_leaves_nothing(location):
    up = location.open_upload("db/logical/y/obj")
    up.write(b"x" * (6 << 20))
    up.abort()
    assert list(location.list("db/")) == []


def test_missing_object_is_not_found(location):
    with pytest.raises(ObjectNotFound):
        location.get_bytes("nope/manifest.json")
    assert location.size("nope/manifest.json") is None


def test_put_list_delete(location):
    location.put_bytes("a/1.json", b"{}")
    location.put_bytes("b/2.json", b"[]")
    assert sorted(o.key for o in location.list()) == ["a/1.json", "b/2.json"]
    assert [o.key for o in location.list("a/")] == ["a/1.json"]
    location.delete("a/1.json")
    assert [o.key for o in location.list()] == ["b/2.json"]


def test_s3_objects_carry_sse_and_storage_class(s3, tmp_path):
    import boto3

    loc = open_location("s3", S3LocationConfig(**s3_location(s3)), tmp_path)
    up = loc.open_upload("k/big")
    up.write(b"z" * (11 << 20))
    up.commit()
    loc.put_bytes("k/small", b"tiny")
    client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    for key in ("soundhash-backups/k/big", "soundhash-backups/k/small"):
        head = client.head_object(Bucket="dr-backups", Key=key)
        assert head["ServerSideEncryption"] == "AES256"
        assert head["StorageClass"] == "STANDARD_IA"


def test_s3_server_down_names_the_location(tmp_path):
    cfg = S3LocationConfig(type="s3", bucket="b", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    loc = open_location("offsite", cfg, tmp_path)
    with pytest.raises(LocationDown, match="location 'offsite': cannot write s3://b/x: Could not connect"):
        loc.put_bytes("x", b"y")
    t0 = time.monotonic()
    with pytest.raises(LocationDown, match="location 'offsite': skipped: down since earlier in this run"):
        list(loc.list())  # known down: skipped at once for the rest of the run
    assert time.monotonic() - t0 < 0.5
    forget_down()
    with pytest.raises(LocationDown, match="location 'offsite': cannot list"):
        list(loc.list())


def test_local_keys_cannot_escape_the_root(tmp_path):
    loc = LocalLocation("local", tmp_path / "repo")
    with pytest.raises(ValueError):
        loc.put_bytes("../outside", b"x")


def test_an_upload_error_names_the_object_once(tmp_path):
    cfg = S3LocationConfig(type="s3", bucket="b", prefix="pre/", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    upload = open_location("offsite", cfg, tmp_path).open_upload("app/logical/x/dump")
    upload.write(b"y")
    with pytest.raises(LocationDown) as e:
        upload.commit()
    assert "s3://b/pre/app/logical/x/dump" in str(e.value) and "pre/pre/" not in str(e.value)
