"""What a restore is asked to do, and the errors it can end with."""

from __future__ import annotations

from dataclasses import dataclass

from dr_pipelines.core.config import ConfigError
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.restore.validation import ValidationResult

NAME_MAX = 63  # PostgreSQL identifiers


class RestoreError(DrError):
    pass


class UnsafeRestore(RestoreError):
    """A destructive step was not confirmed; nothing was touched."""


class BackupUnusable(RestoreError):
    """Every copy of a backup failed: missing, checksum mismatch, or cannot be decrypted."""


class ValidationFailed(RestoreError):
    def __init__(self, result: ValidationResult):
        super().__init__(result.summary())
        self.result = result


@dataclass
class RestoreRequest:
    database: str
    backup: str = "latest"  # "latest", a backup id, or a file path (see `from_file`)
    from_file: bool = False
    location: str | None = None
    target: str | None = None  # database name; default: the configured one
    clean: bool = False
    confirm: str | None = None  # the target's name, repeated
    schema_only: bool = False
    data_only: bool = False
    jobs: int = 2
    no_owner: bool = False
    no_privileges: bool = False
    keep_previous: bool = True

    def check(self) -> None:
        if self.schema_only and self.data_only:
            raise ConfigError("schema_only and data_only are mutually exclusive: choose one (or neither for both)")
        if self.jobs < 1:
            raise ConfigError("jobs must be at least 1")
