"""What every command shares: messages on stderr, the config and its locations, exit codes."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def err(msg: str) -> None:
    print(f"dr-pipelines: error: {msg}", file=sys.stderr)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_from_args(args):
    """--config, else $DR_PIPELINES_CONFIG, else the embedded sandbox. `args.config` becomes the
    absolute path of the file it was read from: the jobs, and the commands PostgreSQL runs, name it."""
    from dr_pipelines.sandbox.config import config_and_file

    config, args.config = config_and_file(args.config)
    return config


def open_cli_locations(config, only: str | None = None):
    from dr_pipelines.core.storage.locations import open_locations

    return open_locations(config, only)


# --------------------------------------------------------------------------- backups list / verify


from dr_pipelines.core.units import human_size  # noqa: E402,F401  (the commands print sizes with it)
