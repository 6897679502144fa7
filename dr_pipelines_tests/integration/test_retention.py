"""Retention: invariants over random histories (hypothesis), and apply against real locations."""

import json
from datetime import datetime, timedelta, timezone

import boto3
from hypothesis import given, settings
from hypothesis import strategies as st

from dr_pipelines.core.backup.logical import run_logical_backup
from dr_pipelines.core.config import RetentionConfig
from dr_pipelines.core.repository.catalog import load_catalog, verify_backup
from dr_pipelines.core.repository.manifest import MANIFEST
from dr_pipelines.core.retention import BackupFacts, plan_retention
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines_tests.support.configs import BUCKET, config_from, gcs_location, local_location, s3_location
from dr_pipelines_tests.support.metadata import text
from dr_pipelines_tests.support.processes import run_cli
from dr_pipelines_tests.support.servers import start_moto

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)

histories = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=800 * 24),  # age in hours
        st.booleans(),  # pinned
        st.sampled_from(["app", "other"]),
    ),
    min_size=0,
    max_size=60,
    unique_by=lambda t: t[0],
)
policies = st.builds(
    RetentionConfig,
    daily_days=st.integers(0, 60),
    weekly_days=st.integers(0, 200),
    monthly_days=st.integers(0, 500),
    min_keep=st.integers(1, 6),
)


def _facts(history):
    return [
        BackupFacts(f"b{age:06d}", db, "logical", NOW - timedelta(hours=age), pinned) for age, pinned, db in history
    ]


@settings(max_examples=300, deadline=None)
@given(histories, policies, st.data())
def test_retention_invariants(history, policy, data):
    backups = _facts(history)
    verified = {}
    for db in ("app", "other"):
        ids = [b.id for b in backups if b.database == db]
        if ids and data.draw(st.booleans()):
            verified[(db, "logical")] = data.draw(st.sampled_from(ids))
    decisions = plan_retention(backups, policy, NOW, verified)
    kept = {d.backup.id for d in decisions if d.keep}
    assert sorted(d.backup.id for d in decisions) == sorted(b.id for b in backups)  # each decided once
    for db in ("app", "other"):
        group = sorted((b for b in backups if b.database == db), key=lambda b: b.created_at, reverse=True)
        # min_keep is a floor: the newest min_keep always stay, however old
        assert {b.id for b in group[: policy.min_keep]} <= kept
        assert len([b for b in group if b.id in kept]) >= min(policy.min_keep, len(group))
        for b in group:
            age = NOW - b.created_at
            if b.pinned or verified.get((db, "logical")) == b.id or age <= timedelta(days=policy.daily_days):
                assert b.id in kept
        # the newest of every week (month) inside the weekly (monthly) window is kept
        for days, period in (
            (policy.weekly_days, lambda d: d.isocalendar()[:2]),
            (policy.monthly_days, lambda d: (d.year, d.month)),
        ):
            newest = {}
            for b in group:
                if NOW - b.created_at <= timedelta(days=days):
                    newest.setdefault(period(b.created_at), b.id)
            assert set(newest.values()) <= kept
    # and nothing is removed without a reason to be gone: every removal is outside every tier
    for d in decisions:
        if not d.keep:
            assert d.reasons == ["older than every tier"]


def test_all_backups_older_than_every_window_keep_the_floor():
    backups = _facts([(24 * (1000 + i), False, "app") for i in range(10)])
    decisions = plan_retention(backups, RetentionConfig(min_keep=3), NOW)
    assert [d.backup.id for d in decisions if d.keep] == [b.id for b in backups[:3]]


def _age(locations, manifest, days):
    """Rewrite a backup's manifest time on every location, as if it were taken `days` ago."""
    for loc in locations.values():
        key = manifest.object_key(MANIFEST)
        data = json.loads(loc.get_bytes(key))
        data["created_at"] = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat()
        loc.put_bytes(key, json.dumps(data).encode())


def test_apply_on_every_location(pg, s3, write_config, tmp_path):
    path = write_config(
        pg,
        {"local": local_location(tmp_path / "b"), "s3": s3_location(s3)},
        retention={"daily_days": 7, "weekly_days": 7, "monthly_days": 7, "min_keep": 1},
    )
    cfg = config_from(path)
    locations = open_locations(cfg)
    manifests = [run_logical_backup(cfg, "app", locations).manifest for _ in range(4)]
    for m, days in zip(manifests, (400, 300, 200, 1), strict=True):
        _age(locations, m, days)
    pin = run_cli("--config", str(path), "backups", "pin", "app", manifests[0].id, "--reason", "audit")
    assert pin.returncode == 0, pin.stderr

    dry = run_cli("--config", str(path), "retention", "apply", "--dry-run")
    assert dry.returncode == 0 and "2 of 4 backups would be removed; no WAL file (dry run)" in dry.stdout
    assert len(load_catalog(locations.values(), "app").entries) == 4  # the dry run removed nothing

    r = run_cli("--config", str(path), "retention", "apply")
    assert r.returncode == 0, r.stderr
    for name, loc in locations.items():
        ids = [e.id for e in load_catalog([loc], "app").entries]
        assert ids == [manifests[3].id, manifests[0].id], name  # newest (floor) and the pinned one
        assert all(verify_backup(loc, e.manifest).ok for e in load_catalog([loc], "app").entries)
        keys = [o.key for o in loc.list()]
        assert not any(manifests[1].id in k or manifests[2].id in k for k in keys), name  # objects gone too


def test_unreadable_location_removes_nothing(pg, write_config, tmp_path):
    doomed = start_moto()
    boto3.client("s3", endpoint_url=doomed.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    path = write_config(
        pg,
        {"local": local_location(tmp_path / "b"), "s3": s3_location(doomed)},
        retention={"daily_days": 0, "weekly_days": 0, "monthly_days": 0, "min_keep": 1},
    )
    cfg = config_from(path)
    for _ in range(3):
        run_logical_backup(cfg, "app", open_locations(cfg))
    doomed.stop()
    r = run_cli("--config", str(path), "retention", "apply")
    assert r.returncode == 1 and "location 's3'" in r.stderr
    assert len(load_catalog(open_locations(cfg, "local").values(), "app").entries) == 3


def test_apply_retention_job_plan_in_metadata(pg, write_config, tmp_path):
    import dagster as dg

    from dr_pipelines.defs.build import build_definitions

    path = write_config(
        pg,
        {"local": local_location(tmp_path / "b")},
        retention={"daily_days": 0, "weekly_days": 0, "monthly_days": 0, "min_keep": 1},
    )
    cfg = config_from(path)
    for _ in range(2):
        run_logical_backup(cfg, "app", open_locations(cfg))
    job = build_definitions(cfg, str(path)).resolve_job_def("apply_retention")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"plan_and_apply_retention": {"config": {"dry_run": False}}}},
    )
    assert result.success
    [event] = [
        e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == "plan_and_apply_retention"
    ]
    md = {k: v.value for k, v in event.step_output_data.metadata.items()}
    assert md["removed"] == 1 and md["backups"] == 2 and "| REMOVE |" in text(md["plan"])
    assert len(load_catalog(open_locations(cfg).values(), "app").entries) == 1


def test_apply_retention_prunes_the_run_history_past_its_days(pg, write_config, tmp_path):
    import dagster as dg
    from dagster._core.storage.runs.schema import RunsTable

    from dr_pipelines.defs.build import build_definitions

    path = write_config(pg, {"local": local_location(tmp_path / "b")}, retention={"run_history_days": 30})
    job = build_definitions(config_from(path), str(path)).resolve_job_def("apply_retention")
    instance = dg.DagsterInstance.ephemeral()
    dry = {"ops": {"plan_and_apply_retention": {"config": {"dry_run": True}}}}
    old, recent = (job.execute_in_process(instance=instance, run_config=dry).run_id for _ in range(2))
    with instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(
            RunsTable.update()
            .where(RunsTable.c.run_id == old)
            .values(create_timestamp=datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=31))
        )
    assert job.execute_in_process(instance=instance, run_config=dry).success
    assert instance.get_run_by_id(old) is not None  # a dry run deletes nothing
    apply = {"ops": {"plan_and_apply_retention": {"config": {"dry_run": False}}}}
    pruning = job.execute_in_process(instance=instance, run_config=apply)
    assert pruning.success
    assert instance.get_run_by_id(old) is None  # 31 days old: deleted
    assert instance.get_run_by_id(recent) is not None and instance.get_run_by_id(pruning.run_id) is not None
    [event] = [
        e for e in pruning.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == "prune_run_history"
    ]
    assert event.step_output_data.metadata["runs_deleted"].value == 1


def test_weekly_and_monthly_keepers_move_to_colder_classes(pg, s3, gcs, write_config, tmp_path):
    # GCS is a location here but without classes: its emulator ignores storageClass on rewrite
    # (it always answers STANDARD), so the GCS move can't be observed in a test.
    path = write_config(
        pg,
        {
            "local": local_location(tmp_path / "b"),
            "s3": {**s3_location(s3), "weekly_storage_class": "GLACIER_IR", "monthly_storage_class": "DEEP_ARCHIVE"},
            "gcs": gcs_location(),
        },
        retention={"daily_days": 7, "weekly_days": 60, "monthly_days": 365, "min_keep": 1},
    )
    cfg = config_from(path)
    locations = open_locations(cfg)
    daily, weekly, monthly = [run_logical_backup(cfg, "app", locations).manifest for _ in range(3)]
    for m, days in ((monthly, 200), (weekly, 40), (daily, 1)):
        _age(locations, m, days)
    plan = run_cli("--config", str(path), "retention", "plan")
    assert "keep (weekly class)" in plan.stdout and "keep (monthly class)" in plan.stdout
    r = run_cli("--config", str(path), "retention", "apply")
    assert r.returncode == 0, r.stderr
    assert "moved 2 copies to a colder storage class" in r.stdout

    s3c = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")

    def s3_class(m, name):
        return s3c.head_object(Bucket=BUCKET, Key=f"soundhash-backups/{m.prefix}/{name}").get(
            "StorageClass", "STANDARD"
        )

    obj = lambda m: m.objects[0].name  # noqa: E731
    assert s3_class(daily, obj(daily)) == "STANDARD_IA"  # recent: untouched
    assert s3_class(weekly, obj(weekly)) == "GLACIER_IR" and s3_class(monthly, obj(monthly)) == "DEEP_ARCHIVE"
    assert s3_class(weekly, "manifest.json") == "STANDARD_IA"  # listing still reads manifests cheaply
    # the moved copy is the same bytes; the others are untouched
    assert verify_backup(locations["s3"], weekly).ok and verify_backup(locations["gcs"], monthly).ok
    assert len(load_catalog(locations.values(), "app").entries) == 3
    again = run_cli("--config", str(path), "retention", "apply")  # idempotent: nothing left to move
    assert "moved 0 copies" in again.stdout
