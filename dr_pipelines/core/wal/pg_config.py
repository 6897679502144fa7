"""The postgresql.conf lines that archive WAL through `dr-pipelines`, and the restore_command."""

from __future__ import annotations

from pathlib import Path

from dr_pipelines.core.config import DrConfig

# --------------------------------------------------------------------------- postgresql.conf


def dr_pipelines_command(config_file: str | None) -> list[str]:
    """This installation's command, absolute (PostgreSQL runs it from its data directory)."""
    import sys

    exe = str(Path(sys.executable).parent / "dr-pipelines")
    return [exe] + (["--config", str(Path(config_file).resolve())] if config_file else [])


def wal_command(config_file: str | None) -> list[str]:
    """What PostgreSQL runs per WAL file: the compiled client (`native/wal_client.c`, built by `./dev
    setup`: ~1 ms a call where a Python start costs ~30) if it was built for this installation,
    else the command itself. The client hands every case it does not serve to the command."""
    import subprocess
    import sys

    from dr_pipelines.core.wal.agent_client import INSTALLATION

    client = Path(sys.executable).parent / "dr-pipelines-wal"
    try:
        built_for = subprocess.run([str(client), "--installation"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        built_for = ""
    if built_for.strip() != INSTALLATION:  # absent, or built for another checkout: it would find no agent
        return dr_pipelines_command(config_file)
    return [str(client)] + dr_pipelines_command(config_file)[1:]


def _shell(args: list[str]) -> str:
    import shlex

    return " ".join(a if a in ("%p", "%f") else shlex.quote(a) for a in args)


def pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def archive_timeout_s(config: DrConfig, database: str) -> int:
    """Half the RPO (a segment switch plus a retried push still land within it), at least 60 s."""
    return max(60, int(config.database(database).objectives.rpo.total_seconds() // 2))


def restore_command(
    config_file: str | None, database: str, only: list[str] | None = None, partial: bool = False
) -> str:
    """`only`: the locations recovery may read (the reachable ones during an outage). `partial`:
    the newest segment may come from wal-stream's partial (a recovery replaying all it can)."""
    restrict = [a for name in only or [] for a in ("--location", name)]
    extra = ["--partial"] if partial else []
    return _shell(wal_command(config_file) + ["wal-fetch", "--db", database, *restrict, *extra, "%f", "%p"])


def streaming_lines(config: DrConfig, database: str) -> list[str]:
    """For `streaming.enabled`: what pg_receivewal needs, and with `synchronous` what makes commits wait."""
    streaming = config.database(database).streaming
    if not streaming.enabled:
        return []
    slot = streaming.slot_name(database)
    lines = [
        f"# dr_pipelines: WAL streamed by `dr-pipelines wal-stream {database}` (pg_receivewal on slot {slot}); the "
        f"user needs REPLICATION and a pg_hba.conf line: host replication {config.database(database).user} <address> ...",
        "max_wal_senders = 10",
        "# a slot that nobody reads keeps WAL forever: a cap (the slot is then invalidated and the archive has a gap)",
        "# max_slot_wal_keep_size = 64GB",
    ]
    if streaming.synchronous:
        lines += [
            "# synchronous: a commit returns only once wal-stream has flushed it (and waits while it is down)",
            "synchronous_standby_names = " + pg_quote(f'"{slot}"'),
            "synchronous_commit = on",
        ]
    return lines


def postgresql_conf_lines(config: DrConfig, database: str, config_file: str | None) -> list[str]:
    push = _shell(wal_command(config_file) + ["wal-push", "--db", database, "%p"])
    return [
        f"# dr_pipelines: WAL archiving for database {database!r} (RPO "
        f"{config.database(database).objectives.rpo}); needs a restart for wal_level/archive_mode",
        "wal_level = replica",
        "archive_mode = on",
        f"archive_command = {pg_quote(push)}",
        f"archive_timeout = {archive_timeout_s(config, database)}s",
        f"# recovery (written by `dr-pipelines pitr`): restore_command = {pg_quote(restore_command(config_file, database))}",
        *streaming_lines(config, database),
    ]
