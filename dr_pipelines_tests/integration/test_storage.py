"""Every location type against its real server: atomic uploads, listing, reading, errors."""

import time

import pytest
import yaml

from dr_pipelines.core.config import GCSLocationConfig, S3LocationConfig
from dr_pipelines.core.storage.base import LocationDown, ObjectNotFound, forget_down
from dr_pipelines.core.storage.local import LocalLocation
from dr_pipelines.core.storage.locations import open_location
from dr_pipelines_tests.support.configs import BUCKET, gcs_location, s3_location


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


def test_object_lock_writes_every_object_locked_and_retention_waits_for_it(pg, write_config, s3, tmp_path):
    """Immutable storage: each object carries its retention; moto refuses a delete under COMPLIANCE; the
    retention plan never tries, and says when each copy becomes deletable."""
    import boto3

    from dr_pipelines_tests.support.processes import run_cli

    client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    client.create_bucket(Bucket="locked", ObjectLockEnabledForBucket=True)
    locked = {**s3_location(s3), "bucket": "locked", "object_lock": {"mode": "COMPLIANCE", "days": 1}}
    path = write_config(pg, {"s3": locked}, None)
    data = yaml.safe_load(path.read_text())
    data["retention"] = {"daily_days": 0, "weekly_days": 0, "monthly_days": 0, "min_keep": 1}
    path.write_text(yaml.safe_dump(data))
    first = run_cli("--config", str(path), "backup", "app")
    assert first.returncode == 0, first.stderr
    second = run_cli("--config", str(path), "backup", "app")
    assert second.returncode == 0, second.stderr
    old_id = first.stdout.strip().splitlines()[-1]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="locked")["Contents"] if old_id in o["Key"]]
    assert keys
    for key in keys:
        head = client.head_object(Bucket="locked", Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"]
    version = client.list_object_versions(Bucket="locked", Prefix=keys[0])["Versions"][0]["VersionId"]
    with pytest.raises(Exception, match="AccessDenied"):
        client.delete_object(Bucket="locked", Key=keys[0], VersionId=version)  # nobody deletes it early

    plan = run_cli("--config", str(path), "retention", "plan")
    assert plan.returncode == 0, plan.stderr
    assert f"kept for now: {old_id} on s3: under object lock, deletable after" in plan.stdout
    applied = run_cli("--config", str(path), "retention", "apply")
    assert applied.returncode == 0, applied.stderr
    assert all(client.head_object(Bucket="locked", Key=k) for k in keys)  # still there, never tried

    plain = {**s3_location(s3), "bucket": BUCKET, "object_lock": {"mode": "GOVERNANCE", "days": 1}}
    bad = write_config(pg, {"s3": plain}, None)
    r = run_cli("--config", str(bad), "backups", "list")
    assert r.returncode == 2 and "locations.s3.object_lock" in r.stderr and "cannot lock objects" in r.stderr


def test_gcs_retention_policy_is_set_and_read_back(gcs):
    from dr_pipelines.core.config import GCSLocationConfig
    from dr_pipelines.core.storage.gcs import GCSLocation, gcs_client

    cfg = GCSLocationConfig(type="gcs", bucket=BUCKET, retention_days=7)
    location = GCSLocation("gcs", cfg, gcs_client(cfg))
    assert location.ensure_retention_policy() == 7 * 86400
    again = GCSLocation("gcs", cfg, gcs_client(cfg))
    again.bucket.reload()
    assert again.bucket.retention_period == 7 * 86400  # read back from the server, not our memory
