"""How the command line reports the failures the domain layer names (no traceback for them)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A job run from the shell failed; the message is the failing step's own."""


# (module, exception class, exit code). Only modules already imported are looked at: an exception
# can't come from a module nobody loaded, and `wal-push` must not pay for importing pandas to fail.
_KNOWN = [
    ("dr_pipelines.core.config", "ConfigError", 2),
    ("dr_pipelines.core.postgres", "DatabaseUnreachable", 1),
    ("dr_pipelines.core.postgres", "ToolMissing", 1),
    ("dr_pipelines.core.cluster", "ClusterError", 1),
    ("dr_pipelines.core.logical_backup", "BackupFailed", 1),
    ("dr_pipelines.core.logical_backup", "PartialBackup", 1),
    ("dr_pipelines.core.repository", "BackupNotFound", 1),
    ("dr_pipelines.core.storage", "LocationError", 1),
    ("dr_pipelines.core.streams", "AllTargetsFailed", 1),
    ("dr_pipelines.core.logical_restore", "RestoreError", 1),
    ("dr_pipelines.core.app_hooks", "HookFailed", 1),
    ("dr_pipelines.core.metrics", "MetricsError", 1),
    ("dr_pipelines.core.wal", "WalError", 1),
    ("dr_pipelines.core.wal", "WalNotFound", 1),
    ("dr_pipelines.core.pitr", "PitrError", 1),
    (__name__, "RunFailed", 1),
]


def exit_code_for(exc: BaseException) -> int | None:
    import sys

    for module, name, code in _KNOWN:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return code
    return None


def user_message(exc: BaseException) -> str:
    return str(exc)
