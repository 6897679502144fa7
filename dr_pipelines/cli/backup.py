"""`backup`, `backups list|verify|pin|unpin`: taking backups and reading the repository."""

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

# --------------------------------------------------------------------------- backup


def cmd_backup(args) -> int:
    config = config_from_args(args)
    config.database(args.db)
    if args.kind == "base":
        return cmd_base_backup(args, config)
    if os.environ.get("DAGSTER_HOME"):
        # Recorded in the Dagster instance, so the backup shows in the UI like a scheduled one.
        from dr_pipelines.defs.runner import materialize_logical_backup

        manifest = materialize_logical_backup(config, args.db, args.config, label=args.label)
    else:
        from dr_pipelines.core.backup.logical import run_logical_backup
        from dr_pipelines.sandbox.config import ensure_sandbox_running

        if config.sandbox:
            ensure_sandbox_running(config, log=log)
        manifest = run_logical_backup(config, args.db, open_cli_locations(config), log=log, label=args.label).manifest
    print(manifest.id)
    return EXIT_OK


def cmd_backups_list(args) -> int:
    from dr_pipelines.core.repository.catalog import load_catalog

    config = config_from_args(args)
    if args.db:
        config.database(args.db)
    catalog = load_catalog(open_cli_locations(config, args.location).values(), args.db)
    if args.json:
        out = [
            {**e.manifest.model_dump(mode="json"), "locations": e.locations, "size_bytes": e.manifest.size_bytes}
            for e in catalog.entries
        ]
        print(json.dumps({"backups": out, "problems": catalog.problems}, indent=2))
    else:
        if not catalog.entries:
            print("no backups found")
        else:
            print(
                f"{'DATABASE':<14} {'KIND':<8} {'BACKUP ID':<24} {'CREATED (UTC)':<20} {'SIZE':>10}  "
                f"{'LOCATIONS':<20} LABEL"
            )
            for e in catalog.entries:
                m = e.manifest
                print(
                    f"{m.database:<14} {m.kind:<8} {m.id:<24} {m.created_at:%Y-%m-%d %H:%M:%S}  "
                    f"{human_size(m.size_bytes):>10}  {','.join(e.locations):<20} {m.label or ''}".rstrip()
                )
        for p in catalog.problems:
            err(f"warning: {p}")
    return EXIT_FAILED if catalog.problems and not catalog.entries else EXIT_OK


def cmd_backups_verify(args) -> int:
    from dr_pipelines.core.repository.catalog import load_catalog, verify_backup

    config = config_from_args(args)
    config.database(args.db)
    locations = open_cli_locations(config, args.location)
    catalog = load_catalog(locations.values(), args.db)
    entry = catalog.find(args.db, args.backup_id) if args.backup_id else catalog.latest(args.db)
    ok = True
    for name in entry.locations:
        report = verify_backup(locations[name], entry.manifest)
        print(report.summary())
        ok &= report.ok
    for name in set(locations) - set(entry.locations):
        print(f"{entry.id} on {name}: FAILED: no manifest there (backup missing on this location)")
        ok = False
    for problem in catalog.problems:  # e.g. a newer backup whose manifest no location can read
        # ids sort by their second; within one second the random suffix says nothing of order
        newer = any(
            part[:16] >= entry.id[:16] and part != entry.id for part in problem.split("/") if part[:8].isdigit()
        )
        print(f"FAILED: {problem}" + (f" (newer than {entry.id}, which was verified instead)" if newer else ""))
        ok = False
    return EXIT_OK if ok else EXIT_FAILED


def cmd_pin(args) -> int:
    from dr_pipelines.core.repository.catalog import load_catalog
    from dr_pipelines.core.retention import set_pin

    config = config_from_args(args)
    locations = open_cli_locations(config)
    entry = load_catalog(locations.values(), args.db).find(args.db, args.backup_id)
    pinned = args.backups_command == "pin"
    done = set_pin(locations.values(), entry, pinned, args.reason or "")
    print(f"{'pinned' if pinned else 'unpinned'} {entry.id} on {', '.join(done)}")
    return EXIT_OK


def cmd_base_backup(args, config) -> int:
    if os.environ.get("DAGSTER_HOME"):  # recorded in the instance, as from the UI
        from dr_pipelines.defs.runner import materialize_base_backup

        backup_id = materialize_base_backup(config, args.db, args.config, label=args.label)
    else:
        from dr_pipelines.core.backup.base import run_base_backup

        backup_id = run_base_backup(config, args.db, open_cli_locations(config), log=log, label=args.label).manifest.id
    print(backup_id)
    return EXIT_OK
