"""`snapshot`, `snapshots list|verify|diff|pin|unpin`, `restore-files`: application files."""

from __future__ import annotations

import json
import os

from dr_pipelines.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    config_from_args,
    err,
    human_size,
    log,
    open_cli_locations,
)


def cmd_snapshot(args) -> int:
    config = config_from_args(args)
    config.file_set(args.file_set)
    if os.environ.get("DAGSTER_HOME"):  # recorded in the instance, as from the UI and the schedule
        from dr_pipelines.defs.runner import materialize_snapshot

        snapshot_id = materialize_snapshot(config, args.file_set, args.config)
    else:
        from dr_pipelines.core.files.snapshot import take_snapshot

        if config.sandbox:
            from dr_pipelines.sandbox.config import ensure_sandbox_running

            ensure_sandbox_running(config, log=log)
        snapshot_id = take_snapshot(config, args.file_set, open_cli_locations(config), log=log).index.id
    print(snapshot_id)
    return EXIT_OK


def cmd_snapshots_list(args) -> int:
    from dr_pipelines.core.files.catalog import load_snapshots

    config = config_from_args(args)
    if args.file_set:
        config.file_set(args.file_set)
    catalog = load_snapshots(open_cli_locations(config, args.location), args.file_set)
    if args.json:
        out = [
            {
                "id": e.id,
                "file_set": e.index.file_set,
                "created_at": e.index.created_at.isoformat(),
                "locations": e.locations,
                "pinned": e.pinned,
                "size_bytes": e.index.size_bytes,
                "stats": e.index.stats.model_dump(),
                "dedup_ratio": e.index.stats.dedup_ratio,
            }
            for e in catalog.entries
        ]
        print(json.dumps({"snapshots": out, "problems": catalog.problems}, indent=2))
    else:
        if not catalog.entries:
            print("no snapshots found")
        else:
            print(
                f"{'FILE SET':<14} {'SNAPSHOT ID':<24} {'CREATED (UTC)':<20} {'FILES':>8} {'NEW':>10} {'PACKS':>10}  LOCATIONS"
            )
            for e in catalog.entries:
                st = e.index.stats
                print(
                    f"{e.index.file_set:<14} {e.id:<24} {e.index.created_at:%Y-%m-%d %H:%M:%S}  {st.files:>8} "
                    f"{human_size(st.bytes_new):>10} {human_size(e.index.size_bytes):>10}  {','.join(e.locations)}"
                    + ("  (pinned)" if e.pinned else "")
                )
        for p in catalog.problems:
            err(f"warning: {p}")
    return EXIT_FAILED if catalog.problems and not catalog.entries else EXIT_OK


def cmd_snapshots_verify(args) -> int:
    from dr_pipelines.core.files.catalog import load_snapshots, verify_snapshot

    config = config_from_args(args)
    config.file_set(args.file_set)
    locations = open_cli_locations(config, args.location)
    catalog = load_snapshots(locations, args.file_set)
    entry = catalog.find(args.file_set, args.snapshot_id) if args.snapshot_id else catalog.latest(args.file_set)
    ok = True
    for name in entry.locations:
        report = verify_snapshot(locations[name], entry)
        print(report.summary())
        ok &= report.ok
    for name in set(locations) - set(entry.locations):
        print(f"{entry.id} on {name}: FAILED: no manifest there (snapshot missing on this location)")
        ok = False
    for problem in catalog.problems:
        print(f"FAILED: {problem}")
        ok = False
    return EXIT_OK if ok else EXIT_FAILED


def cmd_snapshots_diff(args) -> int:
    from dr_pipelines.core.files.restore import diff_snapshots

    config = config_from_args(args)
    d = diff_snapshots(config, open_cli_locations(config), args.file_set, args.a, args.b)
    if args.json:
        print(
            json.dumps(
                {
                    "older": d.older,
                    "newer": d.newer,
                    "added": d.added,
                    "removed": d.removed,
                    "changed": [{"path": p, "what": w} for p, w in d.changed],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"{d.older} -> {d.newer}: {len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed")
    for p in d.added:
        print(f"+ {p}")
    for p in d.removed:
        print(f"- {p}")
    for p, what in d.changed:
        print(f"M {p} ({what})")
    return EXIT_OK


def cmd_snapshots_pin(args) -> int:
    from dr_pipelines.core.files.catalog import load_snapshots
    from dr_pipelines.core.files.format import PIN, snapshot_prefix

    config = config_from_args(args)
    locations = open_cli_locations(config)
    entry = load_snapshots(locations, args.file_set).find(args.file_set, args.snapshot_id)
    pinned = args.snapshots_command == "pin"
    key = f"{snapshot_prefix(args.file_set, entry.id)}/{PIN}"
    done = []
    for name in entry.locations:
        if pinned:
            locations[name].put_bytes(key, json.dumps({"reason": args.reason or ""}).encode())
        else:
            locations[name].delete(key)
        done.append(name)
    print(f"{'pinned' if pinned else 'unpinned'} {entry.id} on {', '.join(done)}")
    return EXIT_OK


def cmd_restore_files(args) -> int:
    from dr_pipelines.defs.runner import restore_files_job

    config = config_from_args(args)
    config.file_set(args.file_set)
    if not args.into and not args.in_place:
        err("say where: --into DIR (a new or empty directory), or --in-place --yes PATHS")
        return 2
    if args.into and args.in_place:
        err("--into and --in-place exclude each other: a new directory, or over the originals")
        return 2
    options = {
        "file_set": args.file_set,
        "snapshot": args.snapshot or "latest",
        "before": args.before,
        "paths": args.path or [],
        "into": os.path.abspath(args.into) if args.into else None,
        "in_place": args.in_place,
        "confirm": args.yes,
        "location": args.location,
    }
    report = restore_files_job(config, args.config, options)
    print(
        f"restored snapshot {report.snapshot_id} of {args.file_set}: {report.files} files, "
        f"{human_size(report.bytes)} into {report.into} (RTO {report.rto_s:.1f}s, every file's SHA-256 verified)"
    )
    return EXIT_OK
