"""How the command line reports the failures the domain layer names (no traceback for them)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A job run from the shell failed; the message is the failing step's own."""


def _known() -> dict[type, int]:
    from dr_pipelines.core.cluster import ClusterError
    from dr_pipelines.core.config import ConfigError
    from dr_pipelines.core.logical_backup import BackupFailed, PartialBackup
    from dr_pipelines.core.postgres import DatabaseUnreachable, ToolMissing
    from dr_pipelines.core.repository import BackupNotFound
    from dr_pipelines.core.storage import LocationError
    from dr_pipelines.core.app_hooks import HookFailed
    from dr_pipelines.core.logical_restore import RestoreError
    from dr_pipelines.core.streams import AllTargetsFailed
    from dr_pipelines.core.metrics import MetricsError
    from dr_pipelines.core.wal import WalError, WalNotFound
    from dr_pipelines.core.pitr import PitrError

    return {
        ConfigError: 2,
        DatabaseUnreachable: 1,
        ToolMissing: 1,
        ClusterError: 1,
        BackupFailed: 1,
        PartialBackup: 1,
        BackupNotFound: 1,
        LocationError: 1,
        AllTargetsFailed: 1,
        RestoreError: 1,
        HookFailed: 1,
        RunFailed: 1,
        MetricsError: 1,
        WalError: 1,
        WalNotFound: 1,
        PitrError: 1,
    }


def exit_code_for(exc: BaseException) -> int | None:
    for cls, code in _known().items():
        if isinstance(exc, cls):
            return code
    return None


def user_message(exc: BaseException) -> str:
    return str(exc)
