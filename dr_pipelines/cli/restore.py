"""`restore`, `test-restore` and `pitr`: they run the same Dagster jobs the UI launches."""

from __future__ import annotations

import json
import os

from dr_pipelines.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    config_from_args,
    err,
    log,
)

# --------------------------------------------------------------------------- restore


def cmd_restore(args) -> int:
    config = config_from_args(args)
    config.database(args.db)
    from dr_pipelines.defs.runner import restore_database
    from dr_pipelines.sandbox.config import ensure_sandbox_running

    if config.sandbox:
        ensure_sandbox_running(config, log=log)
    target = args.into or config.databases[args.db].dbname
    options = {
        "database": args.db,
        "backup": os.path.abspath(args.file) if args.file else (args.backup or "latest"),
        "location": args.location,
        "target_database": args.into,
        "clean": args.clean,
        "confirm": target if args.yes else None,
        "schema_only": args.schema_only,
        "data_only": args.data_only,
        "jobs": args.jobs,
        "no_owner": args.no_owner,
    }
    if args.clean and not args.yes:
        err(f"--clean replaces database {target!r}: add --yes to confirm")
        return EXIT_USAGE
    report = restore_database(config, args.config, options)
    if report.fallback:
        log(f"WARNING: FELL BACK to an older backup: {'; '.join(report.fallback_reasons)}")
    print(
        f"restored {report.backup_id or options['backup']} into {report.target} "
        f"(RTO {report.rto_s:.1f}s, data-loss window {report.data_loss_window_s}s)"
        + (f"; previous database kept as {report.previous_database}" if report.previous_database else "")
    )
    return EXIT_OK


def cmd_test_restore(args) -> int:
    config = config_from_args(args)
    config.database(args.db)
    from dr_pipelines.defs.runner import restore_test

    md = restore_test(config, args.config, args.db, args.backup or "latest", args.no_cleanup)
    print(
        f"restore test of {md['backup_id']}: {'PASSED' if md['passed'] else 'FAILED'}, "
        f"{md['tables']} tables, {md['rows']} rows, RTO {md['rto_s']:.1f}s"
        + (f"; scratch database kept: {md['scratch_database']}" if args.no_cleanup else "")
    )
    if md.get("failure"):
        err(md["failure"])
    return EXIT_OK if md["passed"] else EXIT_FAILED


def cmd_pitr(args) -> int:
    from pathlib import Path

    from dr_pipelines.core.pitr.recover import check_overwrite, parse_target_time
    from dr_pipelines.core.postgres.cluster import free_port
    from dr_pipelines.defs.runner import point_in_time_recovery

    config = config_from_args(args)
    config.database(args.db)
    data_dir = Path(args.data_dir).resolve()
    check_overwrite(data_dir, args.overwrite, args.yes)  # before any job starts: the same rule the job applies
    options = {
        "database": args.db,
        "data_dir": str(data_dir),
        "port": args.port or free_port(),
        "target_time": parse_target_time(args.target_time).isoformat() if args.target_time else None,
        "target_lsn": args.target_lsn,
        "target_xid": args.target_xid,
        "target_name": args.target_name,
        "overwrite": args.overwrite,
        "confirm": args.yes,
        "archive": args.archive,
        "timeout_s": args.timeout,
        "backup_id": args.backup,
        "locations": args.location,
    }
    report = point_in_time_recovery(config, args.config, options)
    print(json.dumps(report.to_dict(), indent=2))
    log(
        f"recovered {args.db} to {report.reached_time} (LSN {report.reached_lsn}, timeline "
        f"{report.timeline}) in {report.rto_s or 0:.1f}s; the cluster runs on 127.0.0.1:{report.port} "
        f"from {report.data_dir}"
    )
    return EXIT_OK
