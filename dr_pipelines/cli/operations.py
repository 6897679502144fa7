"""`retention`, `status`, `report`, `metrics` and `demo`."""

from __future__ import annotations

import json
import sys

from dr_pipelines.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    config_from_args,
    err,
    log,
    open_cli_locations,
)

# --------------------------------------------------------------------------- retention


def cmd_retention(args) -> int:
    from datetime import datetime, timezone

    from dr_pipelines.core.retention import apply_plan, build_plan, plan_json, plan_table

    config = config_from_args(args)
    locations = open_cli_locations(config)
    plan = build_plan(config, locations, datetime.now(timezone.utc))
    for p in plan.problems:
        err(f"warning: {p}")
    if args.action == "plan" or args.dry_run:
        if args.json:
            print(
                json.dumps(
                    {
                        "backups": plan_json(plan.decisions),
                        "wal": [{"database": w.database, "name": w.name, "reason": w.reason} for w in plan.wal],
                        "locked": plan.locked_notes(),
                        "snapshots": plan_json(plan.files.decisions) if plan.files else [],
                        "packs": {"remove": sorted(plan.files.packs), "bytes_freed": plan.files.bytes_freed}
                        if plan.files
                        else {},
                    },
                    indent=2,
                )
            )
        else:
            print(plan_table(plan.decisions))
            for note in plan.locked_notes():
                print(f"kept for now: {note}")
            if plan.files and plan.files.decisions:
                print("\n" + plan_table(plan.files.decisions))
                print(
                    f"\n{len(plan.files.removed)} of {len(plan.files.decisions)} file snapshots would be removed; "
                    f"{len(plan.files.packs)} packs ({plan.files.bytes_freed} bytes) would be freed"
                )
            print(
                f"\n{len(plan.removed)} of {len(plan.decisions)} backups would be removed"
                + (
                    f"; {len(plan.wal)} WAL files ({plan.wal[0].name} .. {plan.wal[-1].name}): {plan.wal[0].reason}"
                    if plan.wal
                    else "; no WAL file"
                )
                + (" (dry run)" if args.dry_run else "")
            )
        return EXIT_OK
    outcome = apply_plan(config, locations, plan, log=log)
    print(outcome.summary())
    for failure in outcome.failures:
        err(failure)
    return EXIT_OK if outcome.complete else EXIT_FAILED


# --------------------------------------------------------------------------- monitoring


def _health(args, integrity: bool = False):
    from datetime import datetime, timezone

    from dr_pipelines.core.monitoring.health import evaluate

    config = config_from_args(args)
    locations = open_cli_locations(config)
    return config, locations, evaluate(config, locations, datetime.now(timezone.utc), integrity=integrity)


def cmd_status(args) -> int:
    _, _, h = _health(args, integrity=args.verify)
    if args.json:
        print(
            json.dumps(
                {"status": h.worst, "checked_at": h.now.isoformat(), "checks": [o.to_dict() for o in h.outcomes]},
                indent=2,
                default=str,
            )
        )
    else:
        for o in h.outcomes:
            print(f"{o.status.upper():8} {o.database:12} {o.check:32} {o.description}")
        print(f"\n{h.worst.upper()}")
    return h.exit_code


def cmd_report(args) -> int:
    from dr_pipelines.core.monitoring.report import build_report, store_report

    config, locations, h = _health(args)
    report = build_report(config, h, args.days)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.to_markdown())
    if args.store:
        stored = store_report(locations, report)
        for key, where in stored.items():
            log(f"stored {key} on {', '.join(where) or 'no location'}")
    return EXIT_OK


def cmd_metrics(args) -> int:
    from prometheus_client import generate_latest

    from dr_pipelines.core.monitoring.metrics import build_registry, export

    config, _, h = _health(args)
    reg = build_registry(config, h)
    done = export(config, reg, args.textfile, args.push)
    for where in done:
        log(f"metrics written to {where}")
    if not done:
        sys.stdout.write(generate_latest(reg).decode())
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from dr_pipelines.sandbox.demo import run_demo

    return run_demo(serve_ui=not args.no_ui, port=args.port)
