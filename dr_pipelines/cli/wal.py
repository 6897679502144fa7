"""`wal-push` (archive_command), `wal-fetch` (restore_command), `wal list` and `pg-config`."""

from __future__ import annotations

import json

from dr_pipelines.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    config_from_args,
    err,
    log,
    open_cli_locations,
)

# --------------------------------------------------------------------------- WAL archive


def cmd_wal_push(args) -> int:
    from dr_pipelines.core.wal.fast_path import push_context
    from dr_pipelines.core.wal.push import push_ahead, wal_push

    context = push_context(args.config, args.db)  # of the config as loaded here, not as it may be later
    config = _named_config(args)
    db, locations = config.named_or_only_database(args.db), open_cli_locations(config)
    wal_push(config, db, args.path, locations)
    try:  # strictly best effort: this segment is archived, whatever happens to the ones after it
        push_ahead(config, db, args.path, locations, context, log=log)
    except Exception as e:
        log(f"warning: archiving ahead failed ({type(e).__name__}: {e}); PostgreSQL's own calls will do it")
    return EXIT_OK


WAL_FETCH_ABORT = 255  # > 125: PostgreSQL aborts recovery instead of reading it as "not found"


def _named_config(args):
    """PostgreSQL runs wal-push and wal-fetch inside a data directory: without a named config they
    would fall back to a new, empty sandbox there and find nothing. They never fall back (and so
    never import the sandbox: this is PostgreSQL's hot path)."""
    import os

    from dr_pipelines.core.config import CONFIG_ENV, ConfigError, load_config

    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(
            f"{args.command} needs --config FILE (or ${CONFIG_ENV}): PostgreSQL runs it from a data "
            "directory, where no other config can be assumed; `dr-pipelines pg-config DB` prints "
            "the lines that name it"
        )
    return load_config(path)


def cmd_wal_fetch(args) -> int:
    from dr_pipelines.core.wal.archive import WalFetchAborted, WalNotFound
    from dr_pipelines.core.wal.fetch import wal_fetch

    try:
        config = _named_config(args)
        db = config.named_or_only_database(args.db)
        for name in args.location or []:
            config.location_names(name)
        identities = None
        if config.encryption.method == "age":
            from dr_pipelines.core.codec.keys import load_identities

            identities = load_identities(config)
        wal_fetch(
            config,
            db,
            args.name,
            args.dest,
            {n: loc for n, loc in open_cli_locations(config).items() if not args.location or n in args.location},
            identities,
            retries=config.wal.fetch_retries,
            backoff_s=config.wal.fetch_backoff.total_seconds(),
            log=log,
            prefetch=config.wal.prefetch,
            partial=args.partial,
        )
    except WalNotFound as e:
        err(str(e))
        return EXIT_FAILED
    except Exception as e:  # anything else is not "not found": recovery must stop, not end early
        err(f"{e}" if isinstance(e, WalFetchAborted) else f"{type(e).__name__}: {e}; aborting recovery")
        return WAL_FETCH_ABORT
    return EXIT_OK


def cmd_wal_stream(args) -> int:
    """In the foreground until SIGTERM or SIGINT (systemd, compose, Kubernetes run it as a service)."""
    import signal
    import threading

    from dr_pipelines.core.wal.stream import run_wal_stream

    config = config_from_args(args)
    config.database(args.db)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    locations = open_cli_locations(config)
    return run_wal_stream(config, args.db, locations, stop, _stamped)


def _stamped(msg: str) -> None:
    """A long-running command's log line: when, and what."""
    from datetime import datetime, timezone

    log(f"{datetime.now(timezone.utc).isoformat(timespec='milliseconds')} wal-stream: {msg}")


def cmd_wal_list(args) -> int:
    from dr_pipelines.core.wal.archive import STREAMED, list_archive

    config = config_from_args(args)
    db = config.named_or_only_database(args.db)
    archive = list_archive(open_cli_locations(config), db)
    for p in archive.problems:
        err(f"warning: {p}")
    out = {
        "database": db,
        "segment_size": archive.segment_size,
        "timelines": [
            {
                "timeline": tli,
                "segments": len(names),
                "first": names[0],
                "last": names[-1],
                "gaps": [{"from": a, "to": b} for a, b in archive.gaps(tli)],
            }
            for tli, names in sorted(archive.segments.items())
        ],
        "history_files": archive.histories,
        # wal-stream's growing segments (pitr replays the newest as the end of the archive)
        "streamed_partials": sorted(n for n, f in archive.files.items() if f.kind == STREAMED),
    }
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
    if out["streamed_partials"]:
        print("streamed partial segments (wal-stream): " + ", ".join(out["streamed_partials"]))
    return EXIT_FAILED if any(t["gaps"] for t in out["timelines"]) else EXIT_OK


def cmd_pg_config(args) -> int:
    from dr_pipelines.core.wal.pg_config import postgresql_conf_lines

    config = config_from_args(args)
    config.database(args.db)
    print("\n".join(postgresql_conf_lines(config, args.db, args.config)))
    return EXIT_OK
