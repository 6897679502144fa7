"""The `dr-pipelines` command.

Imports are deferred into each command: `wal-push` / `wal-fetch` run once per WAL segment and must
not pay for dagster, boto3 or pandas they don't use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"dr-pipelines: error: {msg}", file=sys.stderr)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config(args):
    from dr_pipelines.core.config import load_config

    return load_config(args.config)


def _locations(config, only: str | None = None):
    from dr_pipelines.core.storage import open_locations

    return open_locations(config, only)


# --------------------------------------------------------------------------- backup


def cmd_backup(args) -> int:
    config = _config(args)
    config.database(args.db)
    if args.kind == "base":
        return cmd_base_backup(args, config)
    if os.environ.get("DAGSTER_HOME"):
        # Recorded in the Dagster instance, so the backup shows in the UI like a scheduled one.
        from dr_pipelines.defs.runner import materialize_logical_backup

        manifest = materialize_logical_backup(config, args.db, args.config)
    else:
        from dr_pipelines.core.logical_backup import run_logical_backup
        from dr_pipelines.core.sandbox import ensure_sandbox_running

        if config.sandbox:
            ensure_sandbox_running(config, log=_log)
        manifest = run_logical_backup(config, args.db, _locations(config), log=_log).manifest
    print(manifest.id)
    return EXIT_OK


# --------------------------------------------------------------------------- backups list / verify


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_backups_list(args) -> int:
    from dr_pipelines.core.repository import load_catalog

    config = _config(args)
    if args.db:
        config.database(args.db)
    catalog = load_catalog(_locations(config, args.location).values(), args.db)
    if args.json:
        out = [{**e.manifest.model_dump(mode="json"), "locations": e.locations,
                "size_bytes": e.manifest.size_bytes} for e in catalog.entries]
        print(json.dumps({"backups": out, "problems": catalog.problems}, indent=2))
    else:
        if not catalog.entries:
            print("no backups found")
        else:
            print(f"{'DATABASE':<14} {'KIND':<8} {'BACKUP ID':<24} {'CREATED (UTC)':<20} {'SIZE':>10}  LOCATIONS")
            for e in catalog.entries:
                m = e.manifest
                print(f"{m.database:<14} {m.kind:<8} {m.id:<24} {m.created_at:%Y-%m-%d %H:%M:%S}  "
                      f"{_human(m.size_bytes):>10}  {','.join(e.locations)}")
        for p in catalog.problems:
            _err(f"warning: {p}")
    return EXIT_FAILED if catalog.problems and not catalog.entries else EXIT_OK


def cmd_backups_verify(args) -> int:
    from dr_pipelines.core.repository import load_catalog, verify_backup

    config = _config(args)
    config.database(args.db)
    locations = _locations(config, args.location)
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
    return EXIT_OK if ok else EXIT_FAILED


# --------------------------------------------------------------------------- restore


def cmd_restore(args) -> int:
    config = _config(args)
    config.database(args.db)
    from dr_pipelines.core.sandbox import ensure_sandbox_running
    from dr_pipelines.defs.runner import restore_database

    if config.sandbox:
        ensure_sandbox_running(config, log=_log)
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
        _err(f"--clean replaces database {target!r}: add --yes to confirm")
        return EXIT_USAGE
    report = restore_database(config, args.config, options)
    if report.fallback:
        _log(f"WARNING: FELL BACK to an older backup: {'; '.join(report.fallback_reasons)}")
    print(f"restored {report.backup_id or options['backup']} into {report.target} "
          f"(RTO {report.rto_s:.1f}s, data-loss window {report.data_loss_window_s}s)"
          + (f"; previous database kept as {report.previous_database}" if report.previous_database else ""))
    return EXIT_OK


def cmd_test_restore(args) -> int:
    config = _config(args)
    config.database(args.db)
    from dr_pipelines.defs.runner import restore_test

    md = restore_test(config, args.config, args.db, args.backup or "latest", args.no_cleanup)
    print(f"restore test of {md['backup_id']}: {'PASSED' if md['passed'] else 'FAILED'}, "
          f"{md['tables']} tables, {md['rows']} rows, RTO {md['rto_s']:.1f}s"
          + (f"; scratch database kept: {md['scratch_database']}" if args.no_cleanup else ""))
    if md.get("failure"):
        _err(md["failure"])
    return EXIT_OK if md["passed"] else EXIT_FAILED


# --------------------------------------------------------------------------- retention


def cmd_retention(args) -> int:
    from datetime import datetime, timezone

    from dr_pipelines.core.retention import (apply_retention, apply_tiering, apply_wal_retention, build_plan,
                                             plan_json, plan_table)

    config = _config(args)
    locations = _locations(config)
    plan = build_plan(config, locations, datetime.now(timezone.utc))
    for p in plan.problems:
        _err(f"warning: {p}")
    if args.action == "plan" or args.dry_run:
        if args.json:
            print(json.dumps({"backups": plan_json(plan.decisions),
                              "wal": [{"database": w.database, "name": w.name, "reason": w.reason} for w in plan.wal]},
                             indent=2))
        else:
            print(plan_table(plan.decisions))
            print(f"\n{len(plan.removed)} of {len(plan.decisions)} backups would be removed"
                  + (f"; {len(plan.wal)} WAL files ({plan.wal[0].name} .. {plan.wal[-1].name}): {plan.wal[0].reason}"
                     if plan.wal else "; no WAL file") + (" (dry run)" if args.dry_run else ""))
        return EXIT_OK
    removals = apply_retention(locations, plan.entries, plan.decisions, log=_log)
    moves = apply_tiering(config, locations, plan.entries, plan.decisions, log=_log)
    wal_errors = apply_wal_retention(locations, plan.wal, log=_log)
    failed = [r for r in removals if r.error] + [m for m in moves if m.error] + wal_errors
    print(f"removed {len(plan.removed)} backups ({len([r for r in removals if not r.error])} copies); "
          f"moved {len([m for m in moves if not m.error])} copies to a colder storage class; "
          f"removed {len(plan.wal)} WAL files"
          + (f"; {len(failed)} operations failed" if failed else ""))
    return EXIT_FAILED if failed or plan.problems else EXIT_OK


def cmd_pin(args) -> int:
    from dr_pipelines.core.repository import load_catalog
    from dr_pipelines.core.retention import set_pin

    config = _config(args)
    locations = _locations(config)
    entry = load_catalog(locations.values(), args.db).find(args.db, args.backup_id)
    pinned = args.backups_command == "pin"
    done = set_pin(locations.values(), entry, pinned, args.reason or "")
    print(f"{'pinned' if pinned else 'unpinned'} {entry.id} on {', '.join(done)}")
    return EXIT_OK


# --------------------------------------------------------------------------- WAL archive


def _wal_database(config, db: str | None) -> str:
    from dr_pipelines.core.config import ConfigError

    if db:
        config.database(db)
        return db
    if len(config.databases) == 1:
        return next(iter(config.databases))
    raise ConfigError(f"several databases are configured ({', '.join(config.databases)}); name one")


def cmd_wal_push(args) -> int:
    from dr_pipelines.core.wal import push_ahead, wal_push
    from dr_pipelines.core.wal_spool import push_context

    context = push_context(args.config, args.db)  # of the config as loaded here, not as it may be later
    config = _config(args)
    db, locations = _wal_database(config, args.db), _locations(config)
    wal_push(config, db, args.path, locations)
    try:  # strictly best effort: this segment is archived, whatever happens to the ones after it
        push_ahead(config, db, args.path, locations, context, log=_log)
    except Exception as e:
        _log(f"warning: archiving ahead failed ({type(e).__name__}: {e}); PostgreSQL's own calls will do it")
    return EXIT_OK


WAL_FETCH_ABORT = 255  # > 125: PostgreSQL aborts recovery instead of reading it as "not found"


def cmd_wal_fetch(args) -> int:
    from dr_pipelines.core.wal import WalFetchAborted, WalNotFound, wal_fetch

    try:
        config = _config(args)
        db = _wal_database(config, args.db)
        identities = None
        if config.encryption.method == "age":
            from dr_pipelines.core.streams import load_identities

            identities = load_identities(config)
        wal_fetch(config, db, args.name, args.dest, _locations(config), identities, retries=config.wal.fetch_retries,
                  backoff_s=config.wal.fetch_backoff.total_seconds(), log=_log, prefetch=config.wal.prefetch)
    except WalNotFound as e:
        _err(str(e))
        return EXIT_FAILED
    except Exception as e:  # anything else is not "not found": recovery must stop, not end early
        _err(f"{e}" if isinstance(e, WalFetchAborted) else f"{type(e).__name__}: {e}; aborting recovery")
        return WAL_FETCH_ABORT
    return EXIT_OK


def cmd_wal_list(args) -> int:
    from dr_pipelines.core.wal import list_archive

    config = _config(args)
    db = _wal_database(config, args.db)
    archive = list_archive(_locations(config), db)
    for p in archive.problems:
        _err(f"warning: {p}")
    out = {"database": db, "segment_size": archive.segment_size, "timelines": [
        {"timeline": tli, "segments": len(names), "first": names[0], "last": names[-1],
         "gaps": [{"from": a, "to": b} for a, b in archive.gaps(tli)]}
        for tli, names in sorted(archive.segments.items())], "history_files": archive.histories}
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    if not out["timelines"]:
        print(f"no WAL archived for {db}")
    for t in out["timelines"]:
        gaps = ", ".join(f"{g['from']}..{g['to']}" for g in t["gaps"]) or "none"
        print(f"timeline {t['timeline']}: {t['segments']} segments {t['first']} .. {t['last']}; gaps: {gaps}")
    if archive.histories:
        print("history files: " + ", ".join(archive.histories))
    return EXIT_FAILED if any(t["gaps"] for t in out["timelines"]) else EXIT_OK


def cmd_pg_config(args) -> int:
    from dr_pipelines.core.wal import postgresql_conf_lines

    config = _config(args)
    config.database(args.db)
    print("\n".join(postgresql_conf_lines(config, args.db, args.config)))
    return EXIT_OK


def cmd_base_backup(args, config) -> int:
    if os.environ.get("DAGSTER_HOME"):  # recorded in the instance, as from the UI
        from dr_pipelines.defs.runner import materialize_base_backup

        backup_id = materialize_base_backup(config, args.db, args.config)
    else:
        from dr_pipelines.core.base_backup import run_base_backup

        backup_id = run_base_backup(config, args.db, _locations(config), log=_log).manifest.id
    print(backup_id)
    return EXIT_OK


def _target_time(text: str) -> str:
    from datetime import datetime

    from dr_pipelines.core.config import ConfigError

    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--target-time {text!r} is not an ISO 8601 time (e.g. 2026-11-23T10:15:00+00:00)") from None
    if t.tzinfo is None:
        raise ConfigError(f"--target-time {text!r} has no time zone; add one (e.g. +00:00 or Z)")
    return t.isoformat()


def cmd_pitr(args) -> int:
    from pathlib import Path

    from dr_pipelines.core.cluster import free_port
    from dr_pipelines.defs.runner import point_in_time_recovery

    from dr_pipelines.core.config import ConfigError

    config = _config(args)
    config.database(args.db)
    data_dir = str(Path(args.data_dir).resolve())
    if args.overwrite and args.yes != data_dir:
        raise ConfigError(f"--overwrite replaces the contents of {data_dir}: confirm with --yes {data_dir}")
    options = {"database": args.db, "data_dir": data_dir, "port": args.port or free_port(),
               "target_time": _target_time(args.target_time) if args.target_time else None,
               "target_lsn": args.target_lsn, "target_xid": args.target_xid, "target_name": args.target_name,
               "overwrite": args.overwrite, "confirm": args.yes, "archive": args.archive, "timeout_s": args.timeout,
               "backup_id": args.backup}
    report = point_in_time_recovery(config, args.config, options)
    print(json.dumps(report, indent=2))
    _log(f"recovered {args.db} to {report['reached_time']} (LSN {report['reached_lsn']}, timeline "
         f"{report['timeline']}) in {report['rto_s']:.1f}s; the cluster runs on 127.0.0.1:{report['port']} "
         f"from {report['data_dir']}")
    return EXIT_OK


# --------------------------------------------------------------------------- monitoring


def _health(args, integrity: bool = False):
    from datetime import datetime, timezone

    from dr_pipelines.core.health import evaluate

    config = _config(args)
    locations = _locations(config)
    return config, locations, evaluate(config, locations, datetime.now(timezone.utc), integrity=integrity)


def cmd_status(args) -> int:
    _, _, h = _health(args, integrity=args.verify)
    if args.json:
        print(json.dumps({"status": h.worst, "checked_at": h.now.isoformat(),
                          "checks": [o.to_dict() for o in h.outcomes]}, indent=2, default=str))
    else:
        for o in h.outcomes:
            print(f"{o.status.upper():8} {o.database:12} {o.check:32} {o.description}")
        print(f"\n{h.worst.upper()}")
    return h.exit_code


def cmd_report(args) -> int:
    from dr_pipelines.core.report import build_report, store_report

    config, locations, h = _health(args)
    report = build_report(config, h, args.days)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.to_markdown())
    if args.store:
        stored = store_report(locations, report)
        for key, where in stored.items():
            _log(f"stored {key} on {', '.join(where) or 'no location'}")
    return EXIT_OK


def cmd_metrics(args) -> int:
    from prometheus_client import generate_latest

    from dr_pipelines.core.metrics import build_registry, export

    config, _, h = _health(args)
    reg = build_registry(config, h)
    done = export(config, reg, args.textfile, args.push)
    for where in done:
        _log(f"metrics written to {where}")
    if not done:
        sys.stdout.write(generate_latest(reg).decode())
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from dr_pipelines.demo import run_demo

    return run_demo(serve_ui=not args.no_ui, port=args.port)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dr-pipelines",
        description="Disaster recovery for PostgreSQL: backups, verification and restores.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML config (default: $DR_PIPELINES_CONFIG, else the embedded sandbox)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("backup", help="take a backup now; prints the new backup id")
    b.add_argument("db", metavar="DB")
    b.add_argument("--kind", choices=["logical", "base"], default="logical")
    b.set_defaults(func=cmd_backup)

    bs = sub.add_parser("backups", help="list or verify backups in the repository")
    bsub = bs.add_subparsers(dest="backups_command", required=True, metavar="ACTION")
    bl = bsub.add_parser("list", help="list backups (newest first) from every location")
    bl.add_argument("db", nargs="?", metavar="DB")
    bl.add_argument("--location", metavar="NAME", help="read only this location")
    bl.add_argument("--json", action="store_true")
    bl.set_defaults(func=cmd_backups_list)
    bv = bsub.add_parser("verify", help="read a backup back and check every object's SHA-256")
    bv.add_argument("db", metavar="DB")
    g = bv.add_mutually_exclusive_group()
    g.add_argument("backup_id", nargs="?", metavar="BACKUP_ID")
    g.add_argument("--latest", action="store_true", help="the newest backup (the default)")
    bv.add_argument("--location", metavar="NAME", help="verify only the copy on this location")
    bv.set_defaults(func=cmd_backups_verify)

    for action, text in (("pin", "never remove this backup (retention skips it)"), ("unpin", "undo pin")):
        bp = bsub.add_parser(action, help=text)
        bp.add_argument("db", metavar="DB")
        bp.add_argument("backup_id", metavar="BACKUP_ID")
        if action == "pin":
            bp.add_argument("--reason", help="why it is kept (recorded beside the manifest)")
        else:
            bp.set_defaults(reason=None)
        bp.set_defaults(func=cmd_pin)

    rt = sub.add_parser("retention", help="plan or apply the retention policy on every location")
    rt.add_argument("action", choices=["plan", "apply"])
    rt.add_argument("--dry-run", action="store_true", help="with apply: print the plan, remove nothing")
    rt.add_argument("--json", action="store_true")
    rt.set_defaults(func=cmd_retention)

    r = sub.add_parser("restore", help="restore a logical backup (runs the restore_database job)")
    r.add_argument("db", metavar="DB")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true", help="the newest valid backup (falls back if it is bad)")
    which.add_argument("--backup", metavar="ID", help="this backup id (fails if it is unusable)")
    which.add_argument("--file", metavar="PATH", help="a backup object or pg_dump -Fc file on this host")
    r.add_argument("--location", metavar="NAME", help="read only this location")
    r.add_argument("--into", metavar="DBNAME", help="target database (default: the configured one)")
    r.add_argument("--clean", action="store_true", help="replace an existing target (kept, renamed); needs --yes")
    r.add_argument("--yes", action="store_true", help="confirm --clean without a prompt")
    only = r.add_mutually_exclusive_group()
    only.add_argument("--schema-only", action="store_true")
    only.add_argument("--data-only", action="store_true")
    r.add_argument("--jobs", type=int, default=2, metavar="N", help="parallel pg_restore jobs (default 2)")
    r.add_argument("--no-owner", action="store_true")
    r.set_defaults(func=cmd_restore)

    t = sub.add_parser("test-restore", help="restore into a scratch database, validate, measure RTO, drop it")
    t.add_argument("db", metavar="DB")
    t.add_argument("--backup", metavar="ID")
    t.add_argument("--no-cleanup", action="store_true", help="keep the scratch database")
    t.set_defaults(func=cmd_test_restore)

    pt = sub.add_parser("pitr", help="point-in-time recovery into a new data directory (runs point_in_time_recovery)")
    pt.add_argument("db", metavar="DB")
    target = pt.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-time", metavar="TS", help="ISO 8601 with a time zone, e.g. 2026-11-23T10:15:00+00:00")
    target.add_argument("--target-lsn", metavar="LSN")
    target.add_argument("--target-xid", metavar="XID")
    target.add_argument("--target-name", metavar="NAME", help="a restore point (pg_create_restore_point)")
    target.add_argument("--latest", action="store_true", help="replay all archived WAL")
    pt.add_argument("--data-dir", required=True, metavar="DIR", help="a new directory (never a running cluster's)")
    pt.add_argument("--port", type=int, metavar="N", help="default: a free port")
    pt.add_argument("--backup", metavar="ID", help="this base backup (default: the newest before the target)")
    pt.add_argument("--overwrite", action="store_true", help="replace a non-empty --data-dir; needs --yes DIR")
    pt.add_argument("--yes", metavar="DIR", help="the --data-dir again, to confirm --overwrite")
    pt.add_argument("--archive", action="store_true", help="keep archiving WAL from the recovered cluster")
    pt.add_argument("--timeout", type=float, default=600, metavar="S", help="replay timeout (default 600 s)")
    pt.set_defaults(func=cmd_pitr)

    wp = sub.add_parser("wal-push", help="archive one WAL file (PostgreSQL's archive_command: ... wal-push %%p)")
    wp.add_argument("path", metavar="PATH")
    wp.add_argument("--db", metavar="DB", help="the configured database (needed only when there are several)")
    wp.set_defaults(func=cmd_wal_push)
    wf = sub.add_parser("wal-fetch", help="restore one WAL file (restore_command: ... wal-fetch %%f %%p); "
                                          "exit 1 only if it exists nowhere")
    wf.add_argument("name", metavar="NAME")
    wf.add_argument("dest", metavar="DEST")
    wf.add_argument("--db", metavar="DB")
    wf.set_defaults(func=cmd_wal_fetch)
    wl = sub.add_parser("wal", help="the WAL archive")
    wl.add_argument("wal_command", choices=["list"])
    wl.add_argument("db", nargs="?", metavar="DB", help="needed only when several databases are configured")
    wl.add_argument("--json", action="store_true")
    wl.set_defaults(func=cmd_wal_list)
    pc = sub.add_parser("pg-config", help="print the postgresql.conf lines that archive WAL here")
    pc.add_argument("db", metavar="DB")
    pc.set_defaults(func=cmd_pg_config)

    st = sub.add_parser("status", help="health monitor: exit 0 healthy, 1 warning, 2 error")
    st.add_argument("--json", action="store_true")
    st.add_argument("--verify", action="store_true",
                    help="also read the newest backups back from every location (integrity)")
    st.set_defaults(func=cmd_status)

    rp = sub.add_parser("report", help="compliance report: success rate, RPO/RTO achieved, storage")
    rp.add_argument("--days", type=lambda v: max(1, int(v)), default=30, metavar="N", help="at least 1 (default 30)")
    rp.add_argument("--json", action="store_true")
    rp.add_argument("--store", action="store_true", help="also store JSON/HTML/Markdown copies in the repository")
    rp.set_defaults(func=cmd_report)

    m = sub.add_parser("metrics", help="Prometheus metrics: print, write a textfile, or push to a Pushgateway")
    m.add_argument("--textfile", metavar="PATH", help="node-exporter textfile (default: metrics.textfile)")
    m.add_argument("--push", metavar="URL", help="Pushgateway URL (default: metrics.pushgateway_url)")
    m.set_defaults(func=cmd_metrics)

    d = sub.add_parser("demo", help="the sandbox: backup, then the Dagster UI on 127.0.0.1")
    d.add_argument("--no-ui", action="store_true", help="stop after the backup (no web UI)")
    d.add_argument("--port", type=int, default=3000)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from dr_pipelines.core.wal_spool import fetch_args, push_args, push_context, push_options, take_prefetched, take_pushed

    raw_args = sys.argv[1:] if argv is None else argv
    fetch, push = fetch_args(raw_args), push_args(raw_args)
    try:
        if fetch and take_prefetched(*fetch):  # replay's fast path: the segment was fetched ahead
            return EXIT_OK
        if push and take_pushed(push, push_context(*push_options(raw_args))):  # archived ahead by an earlier call
            return EXIT_OK
    except OSError:
        pass  # the normal way

    args = build_parser().parse_args(argv)
    from dr_pipelines.core.errors import exit_code_for, user_message

    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:  # every failure is loud, with what happened and what to do
        code = exit_code_for(e)
        if code is None:
            raise
        _err(user_message(e))
        return code


if __name__ == "__main__":
    sys.exit(main())
