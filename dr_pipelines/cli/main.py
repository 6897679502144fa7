"""The parser and the entry point; the WAL fast paths run before anything is parsed or imported."""

from __future__ import annotations

import sys

from dr_pipelines.cli.common import EXIT_FAILED, EXIT_OK, err

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~9 ms) on the WAL fast paths
if TYPE_CHECKING:
    import argparse

# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    # imported here, not above: the WAL fast paths in main() run before (and without) any of it
    import argparse

    from dr_pipelines.cli.backup import (
        cmd_backup,
        cmd_backups_list,
        cmd_backups_verify,
        cmd_pin,
    )
    from dr_pipelines.cli.files import (
        cmd_restore_files,
        cmd_snapshot,
        cmd_snapshots_diff,
        cmd_snapshots_list,
        cmd_snapshots_pin,
        cmd_snapshots_verify,
    )
    from dr_pipelines.cli.operations import (
        cmd_demo,
        cmd_metrics,
        cmd_report,
        cmd_retention,
        cmd_status,
    )
    from dr_pipelines.cli.recover import add_recover_parser
    from dr_pipelines.cli.restore import cmd_pitr, cmd_restore, cmd_test_restore
    from dr_pipelines.cli.wal import (
        cmd_pg_config,
        cmd_wal_fetch,
        cmd_wal_list,
        cmd_wal_push,
        cmd_wal_stream,
    )

    # no abbreviated options (--conf for --config): the WAL fast paths read the options without argparse
    p = argparse.ArgumentParser(
        prog="dr-pipelines",
        description="Disaster recovery for PostgreSQL: backups, verification and restores.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML config (default: $DR_PIPELINES_CONFIG, else the embedded sandbox)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("backup", help="take a backup now; prints the new backup id")
    b.add_argument("db", metavar="DB")
    b.add_argument("--kind", choices=["logical", "base"], default="logical")
    b.add_argument(
        "--label", metavar="TEXT", help="name this backup (e.g. pre-migration); restore --backup TEXT picks it"
    )
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

    sn = sub.add_parser("snapshot", help="take a file snapshot of a file set now; prints its id")
    sn.add_argument("file_set", metavar="SET")
    sn.set_defaults(func=cmd_snapshot)

    ss = sub.add_parser("snapshots", help="list, verify, compare or pin file snapshots")
    ssub = ss.add_subparsers(dest="snapshots_command", required=True, metavar="ACTION")
    sl = ssub.add_parser("list", help="list snapshots (newest first) from every location; needs no identity")
    sl.add_argument("file_set", nargs="?", metavar="SET")
    sl.add_argument("--location", metavar="NAME", help="read only this location")
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=cmd_snapshots_list)
    sv = ssub.add_parser("verify", help="read a snapshot's manifest and packs back and check their SHA-256")
    sv.add_argument("file_set", metavar="SET")
    sv.add_argument("snapshot_id", nargs="?", metavar="ID", help="default: the newest")
    sv.add_argument("--location", metavar="NAME", help="verify only the copy on this location")
    sv.set_defaults(func=cmd_snapshots_verify)
    sd = ssub.add_parser("diff", help="files added, removed and changed between two snapshots (needs the identity)")
    sd.add_argument("file_set", metavar="SET")
    sd.add_argument("a", metavar="A")
    sd.add_argument("b", metavar="B")
    sd.add_argument("--json", action="store_true")
    sd.set_defaults(func=cmd_snapshots_diff)
    for action, text in (("pin", "never remove this snapshot (retention skips it)"), ("unpin", "undo pin")):
        sp = ssub.add_parser(action, help=text)
        sp.add_argument("file_set", metavar="SET")
        sp.add_argument("snapshot_id", metavar="ID")
        if action == "pin":
            sp.add_argument("--reason", help="why it is kept")
        else:
            sp.set_defaults(reason=None)
        sp.set_defaults(func=cmd_snapshots_pin)

    rf = sub.add_parser("restore-files", help="restore a file snapshot (runs the restore_files job)")
    rf.add_argument("file_set", metavar="SET")
    rwhich = rf.add_mutually_exclusive_group()
    rwhich.add_argument("--snapshot", metavar="ID", help="this snapshot (default: the newest)")
    rwhich.add_argument("--before", metavar="TS", help="the newest snapshot taken at or before this time (ISO 8601)")
    rf.add_argument("--path", action="append", metavar="P", help="restore only this path (repeatable)")
    rf.add_argument("--into", metavar="DIR", help="a new or empty directory; the snapshot's paths are recreated in it")
    rf.add_argument("--in-place", action="store_true", help="over the original paths; needs --yes naming them")
    rf.add_argument("--yes", metavar="PATHS", help="with --in-place: the set's paths, comma-separated, to confirm")
    rf.add_argument("--location", metavar="NAME", help="read only this location")
    rf.set_defaults(func=cmd_restore_files)

    rt = sub.add_parser("retention", help="plan or apply the retention policy on every location")
    rt.add_argument("action", choices=["plan", "apply"])
    rt.add_argument("--dry-run", action="store_true", help="with apply: print the plan, remove nothing")
    rt.add_argument("--json", action="store_true")
    rt.set_defaults(func=cmd_retention)

    r = sub.add_parser("restore", help="restore a logical backup (runs the restore_database job)")
    r.add_argument("db", metavar="DB")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true", help="the newest valid backup (falls back if it is bad)")
    which.add_argument("--backup", metavar="ID", help="this backup id or label (fails if it is unusable)")
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
    pt.add_argument(
        "--location",
        action="append",
        metavar="NAME",
        help="recover from this location only (repeat for more); default: every location that answers",
    )
    pt.set_defaults(func=cmd_pitr)

    add_recover_parser(sub)

    wp = sub.add_parser(
        "wal-push", help="archive one WAL file (PostgreSQL's archive_command: ... wal-push %%p)", allow_abbrev=False
    )
    wp.add_argument("path", metavar="PATH")
    wp.add_argument("--db", metavar="DB", help="the configured database (needed only when there are several)")
    wp.set_defaults(func=cmd_wal_push)
    wf = sub.add_parser(
        "wal-fetch",
        allow_abbrev=False,
        help="restore one WAL file (restore_command: ... wal-fetch %%f %%p); exit 1 only if it exists nowhere",
    )
    wf.add_argument("name", metavar="NAME")
    wf.add_argument("dest", metavar="DEST")
    wf.add_argument("--db", metavar="DB")
    wf.add_argument(
        "--location", action="append", metavar="NAME", help="read only this location (repeat for more); default: all"
    )
    wf.add_argument(
        "--partial",
        action="store_true",
        help="a segment archived nowhere whole may come from wal-stream's partial segment, when it is the "
        "newest WAL archived (pitr's restore_command asks for this)",
    )
    wf.set_defaults(func=cmd_wal_fetch)
    ws = sub.add_parser(
        "wal-stream",
        help="stream DB's WAL in the foreground (pg_receivewal on a slot; segments and the growing partial "
        "segment pushed to every location) until SIGTERM/SIGINT",
    )
    ws.add_argument("db", metavar="DB")
    ws.add_argument(  # also after the command, as a unit file reads best; absent, the global one stands
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML config (as the global --config)"
    )
    ws.set_defaults(func=cmd_wal_stream)
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
    st.add_argument(
        "--verify", action="store_true", help="also read the newest backups back from every location (integrity)"
    )
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
    d.add_argument(
        "--no-ui", action="store_true", help="run the demo's steps (backup, restore, PITR, files, drill), then exit"
    )
    d.add_argument("--port", type=int, default=3000, help="the Dagster UI's port on 127.0.0.1 (default 3000)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from dr_pipelines.core.wal.fast_path import (
        fetch_args,
        option_values,
        push_args,
        push_context,
        push_options,
        take_prefetched,
        take_pushed,
    )

    raw_args = sys.argv[1:] if argv is None else argv
    fetch, push = fetch_args(raw_args), push_args(raw_args)
    said = compiled_client_said()
    start_agent = False
    try:
        if not said and fetch and take_prefetched(*fetch):  # replay's fast path: the segment was fetched ahead
            return EXIT_OK
        if fetch or push:
            config_file, db = push_options(raw_args)
            context = push_context(config_file, db)
            if not said and push and take_pushed(push, context):  # archived ahead by an earlier call
                return EXIT_OK
            from dr_pipelines.core.wal import agent_client

            if said:  # dr-pipelines-wal took the fast paths and asked the agent: not again
                outcome, why = said
            elif fetch:
                outcome, why = agent_client.fetch_through_agent(
                    *fetch, config_file, context, option_values(raw_args, "--location") or None, "--partial" in raw_args
                )
            else:
                outcome, why = agent_client.push_through_agent(push, config_file, db, context)  # type: ignore[arg-type]
            if outcome == agent_client.DURABLE:  # pushed: on every location; fetched: in place
                return EXIT_OK
            if outcome == agent_client.NOT_FOUND:  # restore_command's "not found": recovery decides
                err(str(why))
                return EXIT_FAILED
            if why:
                err(f"warning: {why}; {'fetching' if fetch else 'pushing'} it here")
            start_agent = outcome == agent_client.ABSENT
    except OSError:
        pass  # the normal way

    args = build_parser().parse_args(argv)
    from dr_pipelines.core.errors import exit_code_for

    try:
        code = args.func(args)
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except Exception as e:  # every failure is loud, with what happened and what to do
        code = exit_code_for(e)
        if code is None:
            raise
        err(str(e))
        return code
    # after the push or fetch, so that its start does not compete with it for the CPU; and only after
    # one that worked: PostgreSQL retries a failing push every second, an agent per retry would pile
    # up. A fetch's "not found" (exit 1) is an answer too: recovery's first call, for a timeline
    # history file that does not exist, starts the agent that serves the segments after it.
    if start_agent and (code == EXIT_OK or (fetch and code == EXIT_FAILED)):
        _start_wal_agent(args, raw_args)
    return code


def compiled_client_said() -> tuple[str, str | None] | None:
    """What `dr-pipelines-wal` (native/wal_client.c), which ran us with its arguments, got from the
    agent: absent, failed or unusable, and why. Only those: an "ok" is never taken from the
    environment. Removed from it, so that an agent this call starts does not inherit it."""
    import os

    outcome, _, why = os.environ.pop("DR_PIPELINES_AGENT", "").partition("\t")
    return (outcome, why or None) if outcome in ("absent", "failed", "unusable") else None


def _start_wal_agent(args, raw_args: list[str]) -> None:
    """Start the cluster's resident archiver for the calls after this one (this call pushed or
    fetched by itself), unless the config turns it off. Best effort: the call reported any problem
    with the config already."""
    import os

    from dr_pipelines.core.config import CONFIG_ENV, load_config
    from dr_pipelines.core.wal.agent_client import start_agent
    from dr_pipelines.core.wal.fast_path import push_context, push_options

    config_file = args.config or os.environ.get(CONFIG_ENV)
    if not config_file:
        return
    context = push_context(*push_options(raw_args))  # the config as it is now, before it is read
    try:
        config = load_config(config_file)
    except Exception:
        return  # the push said what is wrong with it
    if config.wal.agent:
        try:
            start_agent(args.path if args.command == "wal-push" else args.dest, config_file, args.db, context)
        except OSError as e:
            err(f"warning: the archiver agent was not started ({e})")


def run() -> None:
    """The `dr-pipelines` command: main(), then an exit without the interpreter's teardown of every
    module once Dagster is loaded (~0.4 s of a restore command's time, measured). What a normal exit
    does before that runs first, in its order: other threads joined, atexit handlers (logging's
    flush among them), stdout and stderr flushed."""
    code = main()
    if "dagster" not in sys.modules:  # the WAL paths and light commands: nothing to save
        sys.exit(code)
    import atexit
    import os
    import threading

    # what the interpreter's exit calls first: executors told to stop, other threads joined
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()  # then these (weakref finalizers: Dagster's temporary directories go)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
