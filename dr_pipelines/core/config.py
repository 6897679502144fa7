"""The configuration contract: one YAML file declares databases, locations, encryption, retention,
objectives, alerts and schedules.

Secrets are named by environment variable (``*_env`` keys), never written in the file. Unknown keys
and bad values are errors that name the key (``ConfigError``).
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dr_pipelines.core.errors import UsageError

CONFIG_ENV = "DR_PIPELINES_CONFIG"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")


_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ConfigError(UsageError, ValueError):
    """A configuration problem; the message names the key and says what to do."""


def parse_duration(value: Any) -> timedelta:
    """'15m', '1h', '30s', '7d', '2w', or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
        if value.strip().upper().startswith("P"):  # ISO 8601 (PT6H), as pydantic writes durations
            from pydantic import TypeAdapter

            try:
                return TypeAdapter(timedelta).validate_python(value.strip())
            except ValidationError:
                pass
    raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 15m, 1h, 7d")


def check_cron(v: str) -> str:
    from croniter import croniter

    if len(v.split()) != 5 or not croniter.is_valid(v):
        raise ValueError(f"{v!r} is not a 5-field cron expression (e.g. '0 */6 * * *')")
    return v


def cron_interval(expr: str, now: datetime) -> timedelta:
    """The time between the two most recent ticks of a cron expression (UTC)."""
    from croniter import croniter

    it = croniter(expr, now)
    last = it.get_prev(datetime)
    return last - it.get_prev(datetime)


# '15m', '1h', a number of seconds or ISO 8601, validated once here for every duration in the config
Duration = Annotated[timedelta, BeforeValidator(parse_duration), Field(json_schema_extra={"format": "duration"})]
# a 5-field cron expression, UTC
Cron = Annotated[str, AfterValidator(check_cron), Field(json_schema_extra={"format": "cron"})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_env(var: str, what: str) -> str:
    value = os.environ.get(var)
    if value is None or value == "":
        raise ConfigError(f"{what}: environment variable {var} is not set; export it before running")
    return value


class Objectives(_Model):
    rpo: Duration = Field(default=timedelta(minutes=15), description="Recovery point objective")
    rto: Duration = Field(default=timedelta(hours=1), description="Recovery time objective")
    alert_after: Duration | None = Field(
        default=None,
        description="Alert when the newest backup is older than this; default: the backup schedule's "
        "interval plus 2h (6-hourly backups: 8h, SongNodes' alert)",
    )


class BackupSchedule(_Model):
    enabled: bool = True
    schedule: Cron = Field(description="cron expression, UTC")


class CommandHook(_Model):
    command: list[str] = Field(description="argv, run without a shell")


class HttpHook(_Model):
    url: str
    method: Literal["GET", "POST", "PUT"] = "GET"
    expect_status: int = 200


class TcpHook(_Model):
    tcp: str = Field(description="host:port that must accept a connection")


Hook = Union[CommandHook, HttpHook, TcpHook]


class ApplicationHooks(_Model):
    """How to stop, start and health-check the application around a restore (SongNodes: containers)."""

    stop: list[Hook] = Field(default_factory=list)
    start: list[Hook] = Field(default_factory=list)
    health_checks: list[Hook] = Field(default_factory=list)
    timeout: Duration = timedelta(seconds=120)
    health_retries: int = Field(default=30, ge=1)
    health_interval: Duration = timedelta(seconds=2)


class MigrationsCheck(_Model):
    table: str = Field(description="e.g. alembic_version or schema_migrations")
    column: str = "version_num"
    expected: str | None = Field(default=None, description="fail unless the latest version is this")


class ValidationConfig(_Model):
    """Checks a restored database must pass, beyond row counts and schema against the manifest."""

    required_tables: list[str] = Field(default_factory=list, description="schema.table or table (public)")
    zero_row_queries: dict[str, str] = Field(
        default_factory=dict, description="name -> SELECT that must return no rows (orphans, NULLs)"
    )
    migrations: MigrationsCheck | None = None
    amcheck: bool = Field(default=True, description="bt_index_check every B-tree index when amcheck exists")


class RestoreTestConfig(_Model):
    host: str | None = Field(default=None, description="test server; default: the database's own server")
    port: int | None = None
    user: str | None = None
    password_env: str | None = None
    schedule: Cron | None = Field(default=None, description="cron, UTC; default: schedules.restore_test")
    max_age: Duration = Field(default=timedelta(days=7), description="the restore test must be this recent")
    jobs: int = Field(default=2, ge=1)
    keep: bool = False


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$")


_UNIT_BYTES = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> int:
    """'4GB', '512MB', '64kB' (1024-based, as PostgreSQL reads its own settings), or a byte count."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _UNIT_BYTES[(m.group(2) or "B")[0].upper()])
    raise ValueError(f"{value!r} is not a size; write e.g. 4GB, 512MB or a number of bytes")


# '4GB', '512MB' or a byte count
ByteSize = Annotated[int, BeforeValidator(parse_size), Field(json_schema_extra={"format": "size"})]


_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")


class StreamingConfig(_Model):
    """WAL streamed as it is written (`dr-pipelines wal-stream DB`): a managed pg_receivewal on a
    physical replication slot, its segments pushed like archive_command's, the growing partial
    segment pushed every `partial_interval` (RPO about that interval; zero with `synchronous`)."""

    enabled: bool = Field(
        default=False,
        description="stream this database's WAL; `dr-pipelines wal-stream DB` must then run (the WAL "
        "observer alerts when it does not); keep archive_command on as well",
    )
    slot: str | None = Field(
        default=None,
        description='the physical replication slot (created if missing); default "dr_pipelines_<db>". '
        "It makes PostgreSQL keep WAL until it is received: drop it when streaming is turned off for good",
    )
    partial_interval: Duration = Field(
        default=timedelta(seconds=1),
        description="how often the growing partial segment is pushed (under <segment>.stream.partial, "
        "overwritten as it grows); a lost server loses at most about this much",
    )
    synchronous: bool = Field(
        default=False,
        description="pg_receivewal flushes and confirms every write (--synchronous); with "
        "synchronous_standby_names naming the slot (`pg-config DB` prints the line), a commit returns "
        "only once the streamer has it on disk",
    )
    max_slot_wal: ByteSize = Field(
        default=4 << 30,
        description="alert when the slot holds back more WAL than this (e.g. 4GB): the streamer is down "
        "or behind, and the primary's disk fills",
    )
    spool_dir: str | None = Field(
        default=None,
        description="wal-stream's directory (relative to the config file): pg_receivewal's files in wal/ "
        "(private; kept until every location has them), status.json (what the observer reads on this host) "
        "and a lock; default ~/.local/state/dr_pipelines/wal_stream/<db> of the user running wal-stream. "
        "For zero loss, on another machine than the primary",
    )

    @field_validator("partial_interval")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v.total_seconds() <= 0:
            raise ValueError("must be more than 0s (e.g. 1s)")
        return v

    @field_validator("slot")
    @classmethod
    def _slot_name(cls, v: str | None) -> str | None:
        if v is not None and not _SLOT.match(v):
            raise ValueError(f"{v!r} is not a replication slot name (lower-case letters, digits and _, at most 63)")
        return v

    def slot_name(self, database: str) -> str:
        """The slot, also pg_receivewal's application_name (what synchronous_standby_names names)."""
        name = self.slot or f"dr_pipelines_{database.lower()}"
        if not _SLOT.match(name):
            raise ConfigError(
                f"databases.{database}.streaming.slot: the default slot name {name!r} is too long; set slot"
            )
        return name

    def spool_path(self, database: str, base_dir: Path) -> Path:
        if self.spool_dir is None:
            return Path("~/.local/state/dr_pipelines/wal_stream").expanduser() / database
        p = Path(self.spool_dir).expanduser()
        return p if p.is_absolute() else (base_dir / p)


class DatabaseConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = "postgres"
    password_env: str | None = Field(default=None, description="Name of the environment variable holding the password")
    dbname: str
    objectives: Objectives = Objectives()
    logical_backup: BackupSchedule = BackupSchedule(schedule="0 */6 * * *")
    base_backup: BackupSchedule = BackupSchedule(schedule="0 2 * * *")
    pgdata: str | None = None
    pg_bin_dir: str | None = Field(
        default=None, description="Directory of pg_dump/pg_restore; default: PATH, then /usr/lib/postgresql/15/bin"
    )
    sslmode: str | None = None
    validation: ValidationConfig = ValidationConfig()
    application: ApplicationHooks = ApplicationHooks()
    restore_test: RestoreTestConfig = RestoreTestConfig()
    scratch_dir: str | None = Field(
        default=None, description="where a restore's private plaintext directory goes (default /var/tmp)"
    )
    streaming: StreamingConfig = Field(
        default=StreamingConfig(), description="stream WAL with pg_receivewal for an RPO of seconds (wal-stream)"
    )
    restore_spool: bool = Field(
        default=True,
        description="decode a logical backup into the private scratch directory, so pg_restore "
        "loads tables (as it decodes) and builds indexes in parallel (needs free space for the plain dump; streams when short). "
        "false: table data never touches disk, and tables load one at a time",
    )
    restore_while_decoding: bool = Field(
        default=True,
        description="with restore_spool: load the tables into the staging database while the dump decodes "
        "(a copy that fails its checksum at the end fails the restore and the staging database is dropped). "
        "false: only a copy verified whole is loaded, with pg_restore -j, after decoding",
    )

    def freshness_limit(self, now: datetime, kind: str = "logical") -> timedelta:
        """How old the newest backup of a kind may be before it is an incident."""
        if kind == "base":
            return cron_interval(self.base_backup.schedule, now) + timedelta(hours=2)
        if self.objectives.alert_after is not None:
            return self.objectives.alert_after
        return cron_interval(self.logical_backup.schedule, now) + timedelta(hours=2)

    def test_server(self) -> DatabaseConfig:
        """The server restore tests run on: the database's own unless restore_test names another."""
        t = self.restore_test
        return self.model_copy(
            update={
                "host": t.host or self.host,
                "port": t.port or self.port,
                "user": t.user or self.user,
                "password_env": t.password_env if t.host else (t.password_env or self.password_env),
            }
        )

    def password(self, name: str) -> str | None:
        if self.password_env is None:
            return None
        return _read_env(self.password_env, f"databases.{name}.password_env")

    def libpq_env(self, name: str) -> dict[str, str]:
        """Connection settings as libpq environment variables: the password stays out of argv."""
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": self.dbname,
        }
        password = self.password(name)
        if password is not None:
            env["PGPASSWORD"] = password
        if self.sslmode:
            env["PGSSLMODE"] = self.sslmode
        return env

    def conninfo(self, name: str, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect."""
        kw: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname or self.dbname,
            "connect_timeout": 10,
            "application_name": "dr_pipelines",
        }
        password = self.password(name)
        if password is not None:
            kw["password"] = password
        if self.sslmode:
            kw["sslmode"] = self.sslmode
        return kw


class LocalLocationConfig(_Model):
    type: Literal["local"]
    path: str
    region: str | None = Field(default=None, description="where it is (a label): failover reports the region used")

    def resolved_path(self, base_dir: Path) -> Path:
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else (base_dir / p)


class RemoteLocation(_Model):
    """How long a remote location may take to answer before it counts as down: a dead location
    must cost seconds, not the client libraries' default minutes of retries."""

    region: str | None = Field(default=None, description="where it is (a label): failover reports the region used")

    connect_timeout: Duration = Field(default=timedelta(seconds=3), description="to open a connection")
    read_timeout: Duration = Field(default=timedelta(seconds=60), description="for an answer once connected")
    retry_for: Duration = Field(
        default=timedelta(seconds=6),
        description="how long a retryable error (timeout, 5xx, connection refused) is retried before the location "
        "counts as down; a down location is skipped, with a warning, for the next 5 minutes of the run",
    )


class ObjectLock(_Model):
    """S3 Object Lock: every object is written with this retention, so nobody (ransomware with the backup
    host's keys included) can delete or overwrite it before it expires. The bucket must have been created
    with Object Lock enabled."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"] = Field(
        description="COMPLIANCE: no one can delete before expiry; GOVERNANCE: only with the bypass permission"
    )
    days: int = Field(ge=1, le=36500, description="retention of each object from when it is written")


class S3LocationConfig(RemoteLocation):
    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    storage_class: str = "STANDARD"
    sse: Literal["AES256", "aws:kms", "none"] | None = "AES256"
    sse_kms_key_id: str | None = None
    access_key_id_env: str | None = Field(default=None, description="Variable holding the access key id")
    secret_access_key_env: str | None = Field(default=None, description="Variable holding the secret key")
    multipart_chunk_mb: int = Field(default=16, ge=5, le=5120)
    weekly_storage_class: str | None = Field(
        default=None,
        description="retention moves weekly keepers here (e.g. STANDARD_IA); objects in "
        "GLACIER/DEEP_ARCHIVE need an S3 restore before they can be read",
    )
    monthly_storage_class: str | None = Field(default=None, description="monthly keepers (e.g. GLACIER_IR)")
    object_lock: ObjectLock | None = Field(
        default=None, description="write every object locked for this long (immutable storage against ransomware)"
    )

    def credentials(self, name: str) -> dict[str, str]:
        if not self.access_key_id_env and not self.secret_access_key_env:
            return {}  # boto3's default chain (env, profile, instance role)
        if not (self.access_key_id_env and self.secret_access_key_env):
            raise ConfigError(f"locations.{name}: set both access_key_id_env and secret_access_key_env, or neither")
        return {
            "aws_access_key_id": _read_env(self.access_key_id_env, f"locations.{name}.access_key_id_env"),
            "aws_secret_access_key": _read_env(self.secret_access_key_env, f"locations.{name}.secret_access_key_env"),
        }


class GCSLocationConfig(RemoteLocation):
    type: Literal["gcs"]
    bucket: str
    prefix: str = ""
    project: str | None = None
    storage_class: str | None = None
    chunk_mb: int = Field(default=16, ge=1, le=1024)
    weekly_storage_class: str | None = Field(default=None, description="retention moves weekly keepers here (NEARLINE)")
    monthly_storage_class: str | None = Field(default=None, description="monthly keepers (COLDLINE or ARCHIVE)")
    retention_days: int | None = Field(
        default=None,
        ge=1,
        description="the bucket's retention policy (objects cannot be deleted or replaced before this age); "
        "set on the bucket at start and read back",
    )


LocationConfig = Annotated[Union[LocalLocationConfig, S3LocationConfig, GCSLocationConfig], Field(discriminator="type")]


class EncryptionConfig(_Model):
    method: Literal["age", "none"] = "none"
    recipients: list[str] = Field(default_factory=list, description="age public keys (age1...)")
    identity_file_env: str | None = Field(
        default=None, description="Variable naming the age identity file; needed only to restore"
    )
    identity_file: str | None = Field(
        default=None, description="Path of the age identity file (alternative to identity_file_env)"
    )

    @model_validator(mode="after")
    def _recipients(self) -> EncryptionConfig:
        if self.method == "age":
            if not self.recipients:
                raise ValueError("method age needs at least one recipient (age1...) in recipients")
            import pyrage  # parsed here, so a bad key is refused at load, not by the first backup or wal-push

            for r in self.recipients:
                if not r.startswith("age1"):
                    raise ValueError(
                        f"recipient {r[:12]!r}... is not an age public key (age1...); "
                        "never put an identity (AGE-SECRET-KEY-...) in the config"
                    )
                try:
                    pyrage.x25519.Recipient.from_str(r)
                except Exception as e:
                    raise ValueError(
                        f"recipient {r[:12]!r}... is not a valid age public key ({e}); "
                        "copy it again from `age-keygen -y IDENTITY_FILE`"
                    ) from None
        return self

    def identity_path(self) -> Path | None:
        if self.identity_file_env and os.environ.get(self.identity_file_env):
            return Path(os.environ[self.identity_file_env])
        if self.identity_file:
            return Path(self.identity_file).expanduser()
        return None


class CompressionConfig(_Model):
    method: Literal["zstd", "gzip", "none"] = "zstd"
    level: int = Field(default=3, ge=1, le=19)
    threads: int = Field(default=0, ge=0, description="zstd worker threads; 0 = one per core")

    @model_validator(mode="after")
    def _level(self) -> CompressionConfig:
        if self.method == "gzip" and self.level > 9:
            raise ValueError("gzip level must be 1..9")
        return self


class RetentionConfig(_Model):
    daily_days: int = Field(default=30, ge=0)
    weekly_days: int = Field(default=90, ge=0)
    monthly_days: int = Field(default=365, ge=0)
    min_keep: int = Field(default=3, ge=1)
    wal_days: int = Field(default=30, ge=0)
    run_history_days: int | None = Field(
        default=None,
        ge=1,
        description="delete Dagster's records of finished runs older than this (the repository's reports "
        "stay); default: keep them",
    )


class ChecksConfig(_Model):
    size_tolerance: float = Field(
        default=0.5,
        gt=0,
        description="size anomaly: allowed deviation from the rolling mean of recent good backups (0.5 = +/-50%)",
    )
    size_window: int = Field(default=10, ge=2, description="how many recent good backups the mean covers")
    size_min_history: int = Field(default=3, ge=1, description="no size verdict before this many backups")


class MetricsConfig(_Model):
    textfile: str | None = Field(default=None, description="node-exporter textfile path (*.prom)")
    pushgateway_url: str | None = Field(default=None, description="e.g. http://127.0.0.1:9091")
    job: str = "dr_pipelines"


class WebhookAlertConfig(_Model):
    type: Literal["webhook"]
    url_env: str = Field(description="Variable holding the webhook URL (it usually embeds a token)")
    format: Literal["slack", "discord", "generic"] = "slack"


class PagerDutyAlertConfig(_Model):
    type: Literal["pagerduty"]
    routing_key_env: str
    url: str = "https://events.pagerduty.com/v2/enqueue"


AlertConfig = Annotated[Union[WebhookAlertConfig, PagerDutyAlertConfig], Field(discriminator="type")]


class WalConfig(_Model):
    fetch_retries: int = Field(
        default=3, ge=0, description="wal-fetch retries a transient error this often, then aborts recovery"
    )
    fetch_backoff: Duration = Field(default=timedelta(seconds=1), description="first retry delay (doubles)")
    prefetch: int = Field(
        default=16,
        ge=0,
        le=256,
        description="wal-fetch fetches this many following segments ahead, in parallel, during recovery (0: off)",
    )
    archive_wait: Duration = Field(
        default=timedelta(minutes=5),
        description="how long a base backup waits for its WAL to be archived before it fails",
    )
    push_ahead: int = Field(
        default=8,
        ge=0,
        le=64,
        description="wal-push also archives, in parallel, up to this "
        "many later segments PostgreSQL has marked ready, so its calls for them return at once "
        "and a burst of WAL does not queue behind one process start per segment (0: off)",
    )
    agent: bool = Field(
        default=True,
        description="wal-push hands each segment to a resident archiver per cluster (started by the first "
        "call; it keeps the config and the storage clients warm) and returns 0 only when it reports the "
        "segment durable everywhere; wal-fetch asks it for what recovery needs, and it keeps the next "
        "`prefetch` segments spooled ahead of replay; when the archiver is off, unreachable or fails, the "
        "command does the work by itself",
    )
    agent_idle: Duration = Field(
        default=timedelta(minutes=15),
        description="the resident archiver exits after this long without a request; longer than archive_timeout "
        "(pg-config sets it from the RPO, at most 7.5 min), or on a quiet database every segment would start one",
    )


class FileSetHooks(_Model):
    """Commands around a snapshot (e.g. stop a container before its volume is read, start it after)."""

    before: list[Hook] = Field(default_factory=list, description="run before the scan; a failure stops the snapshot")
    after: list[Hook] = Field(default_factory=list, description="run after the scan, also when it failed")
    timeout: Duration = timedelta(seconds=120)


class FileSetObjectives(_Model):
    rpo: Duration | None = Field(
        default=None, description="how old the newest snapshot may get; default: the schedule's interval plus 2h"
    )
    rto: Duration = Field(default=timedelta(hours=1), description="recovery time objective of a file restore")


class FileSetConfig(_Model):
    """A set of application files snapshotted together (deduplicated, encrypted to the recipients)."""

    paths: list[str] = Field(
        min_length=1, description="files and directories; relative ones resolve against the config file"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="glob patterns (fnmatch) on the full path or on a name, e.g. '*.log', '/srv/app/tmp'",
    )
    exclude_if_present: list[str] = Field(
        default_factory=list, description="skip a directory holding a file of this name (e.g. .nobackup)"
    )
    exclude_caches: bool = Field(default=False, description="skip directories tagged with a valid CACHEDIR.TAG")
    one_file_system: bool = Field(default=False, description="do not cross into other mounted file systems")
    schedule: Cron = Field(default="0 */6 * * *", description="cron, UTC")
    enabled: bool = True
    objectives: FileSetObjectives = FileSetObjectives()
    secrets: bool = Field(
        default=False, description="holds secrets: must be encrypted, and no file name or content is ever logged"
    )
    skip_unreadable: bool = Field(
        default=False, description="an unreadable file is listed and skipped (default: the snapshot fails)"
    )
    hooks: FileSetHooks = FileSetHooks()

    def rpo(self, now: datetime) -> timedelta:
        return self.objectives.rpo or cron_interval(self.schedule, now) + timedelta(hours=2)

    def resolved_paths(self, base_dir: Path) -> list[Path]:
        out = []
        for p in self.paths:
            path = Path(p).expanduser()
            out.append(path if path.is_absolute() else (base_dir / path))
        return out


class FilesConfig(_Model):
    """Where the backup host keeps its file-snapshot state, and the format's sizes."""

    state_dir: str = Field(
        default="~/.local/state/dr_pipelines",
        description="the dedup key (keep it: without it a snapshot re-uploads what is stored) and the files cache "
        "(losing it costs a re-read, never a re-upload); relative to the config file",
    )
    pack_size_mb: int = Field(default=16, ge=1, le=256, description="size of the encrypted packs chunks go into")
    change_tolerance: float = Field(
        default=3.0,
        gt=1,
        description="change-rate anomaly: new bytes above this many times the rolling mean of recent snapshots "
        "(mass encryption by ransomware looks like this)",
    )
    change_min_bytes: int = Field(
        default=16 << 20, ge=0, description="below this many new bytes a change is never an anomaly"
    )

    def resolved_state_dir(self, base_dir: Path) -> Path:
        p = Path(self.state_dir).expanduser()
        return p if p.is_absolute() else (base_dir / p)


class ServiceConfig(ApplicationHooks):
    """A part of the system recovery starts (SongNodes: database, cache, queue, then API and workers, then
    the frontend): how to stop and start it, how to know it is healthy, what it needs first."""

    after: list[str] = Field(default_factory=list, description="services that must be healthy before this one starts")
    databases: list[str] = Field(default_factory=list, description="configured databases this service owns")
    file_sets: list[str] = Field(default_factory=list, description="configured file sets this service owns")
    paths: list[str] = Field(
        default_factory=list,
        description="its own files inside those file sets (a rollback restores only these); default: the whole sets",
    )
    rto: Duration | None = Field(default=None, description="recovery time objective of this service")


class RecoveryConfig(_Model):
    """Whole-system recovery: where drills restore, where a compromised system is quarantined, the objectives."""

    drill_dir: str = Field(
        default="~/.local/state/dr_pipelines/drills",
        description="scratch targets of the weekly full-system drill (relative to the config file)",
    )
    drill_schedule: Cron = Field(default="0 3 * * 0", description="the full-system drill, cron UTC (weekly)")
    drill_enabled: bool = True
    quarantine_dir: str = Field(
        default="~/.local/state/dr_pipelines/quarantine",
        description="where ransomware recovery captures the compromised data (hashed; never restored from, "
        "never touched by retention)",
    )
    incident_margin: Duration = Field(
        default=timedelta(minutes=30),
        description="ransomware: the last good point must be this much older than the incident time",
    )
    rto: Duration = Field(default=timedelta(hours=4), description="the whole system's recovery time objective")
    rpo: Duration = Field(default=timedelta(hours=1), description="the whole system's recovery point objective")

    def resolved(self, value: str, base_dir: Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)


class SchedulesConfig(_Model):
    running: bool | None = Field(
        default=None, description="Start schedules and sensors RUNNING; default: yes outside the sandbox"
    )
    restore_test: Cron = "0 4 * * *"
    retention: Cron = "30 3 * * *"
    report: Cron = "0 6 * * 1"
    health_checks: Cron = Field(default="*/15 * * * *", description="freshness, size, replication, restore-test checks")
    integrity: Cron = Field(default="0 5 * * *", description="read every object of the newest backups back")
    metrics: Cron = Field(default="*/5 * * * *", description="Prometheus textfile / Pushgateway export")
    sensor_interval_s: int = Field(default=60, ge=10, description="how often the alert sensors look")


class DrConfig(_Model):
    databases: dict[str, DatabaseConfig]
    locations: dict[str, LocationConfig]
    encryption: EncryptionConfig = EncryptionConfig()
    compression: CompressionConfig = CompressionConfig()
    retention: RetentionConfig = RetentionConfig()
    alerts: dict[str, AlertConfig] = Field(default_factory=dict)
    file_sets: dict[str, FileSetConfig] = Field(default_factory=dict)
    files: FilesConfig = FilesConfig()
    services: dict[str, ServiceConfig] = Field(default_factory=dict)
    recovery: RecoveryConfig = RecoveryConfig()
    checks: ChecksConfig = ChecksConfig()
    wal: WalConfig = WalConfig()
    metrics: MetricsConfig = MetricsConfig()
    schedules: SchedulesConfig = SchedulesConfig()
    webserver_url: str = "http://127.0.0.1:3000"

    # Not from the file: where relative paths resolve, and whether this is the embedded sandbox.
    base_dir: Path = Field(default=Path("."), exclude=True)
    sandbox: bool = Field(default=False, exclude=True)

    @field_validator("databases", "locations")
    @classmethod
    def _names(cls, v: dict) -> dict:
        if not v:
            raise ValueError("declare at least one")
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must start with a letter and hold only letters, digits and _")
        return v

    @field_validator("file_sets", "services")
    @classmethod
    def _set_names(cls, v: dict) -> dict:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must start with a letter and hold only letters, digits and _")
        return v

    @model_validator(mode="after")
    def _secrets_encrypted(self) -> DrConfig:
        for name, fs in self.file_sets.items():
            if fs.secrets and self.encryption.method == "none":
                raise ValueError(
                    f"file set {name!r} holds secrets (secrets: true) but encryption.method is none; "
                    "set encryption.method: age with recipients, or the secrets would be stored in the clear"
                )
        return self

    @model_validator(mode="after")
    def _slot_names(self) -> DrConfig:
        """A streamed database's slot name is valid now, not when wal-stream or the observer needs it."""
        for name, db in self.databases.items():
            if db.streaming.enabled and db.streaming.slot is None and not _SLOT.match(f"dr_pipelines_{name.lower()}"):
                raise ValueError(
                    f"databases.{name}.streaming.slot: the default slot name dr_pipelines_{name.lower()} is "
                    "longer than 63 characters; set slot (lower-case letters, digits and _)"
                )
        return self

    @model_validator(mode="after")
    def _services(self) -> DrConfig:
        for name, svc in self.services.items():
            for field_name, known in (
                ("after", self.services),
                ("databases", self.databases),
                ("file_sets", self.file_sets),
            ):
                for ref in getattr(svc, field_name):
                    if ref not in known:
                        raise ValueError(
                            f"services.{name}.{field_name}: {ref!r} is not configured; "
                            f"configured: {', '.join(known) or 'none'}"
                        )
            if name in svc.after:
                raise ValueError(f"services.{name}.after: a service cannot start after itself")
        cycle = _cycle({n: s.after for n, s in self.services.items()})
        if cycle:
            raise ValueError(
                f"services: the `after` dependencies form a cycle ({' -> '.join(cycle)}); no start order exists"
            )
        return self

    def service(self, name: str) -> ServiceConfig:
        try:
            return self.services[name]
        except KeyError:
            configured = ", ".join(self.services) or "none"
            raise ConfigError(f"no service named {name!r} in the config; configured: {configured}") from None

    def file_set(self, name: str) -> FileSetConfig:
        try:
            return self.file_sets[name]
        except KeyError:
            configured = ", ".join(self.file_sets) or "none"
            raise ConfigError(f"no file set named {name!r} in the config; configured: {configured}") from None

    def database(self, name: str) -> DatabaseConfig:
        try:
            return self.databases[name]
        except KeyError:
            raise ConfigError(
                f"no database named {name!r} in the config; configured: {', '.join(self.databases)}"
            ) from None

    def named_or_only_database(self, name: str | None) -> str:
        """`name` if configured, else the one database there is (the WAL commands' --db)."""
        if name:
            self.database(name)
            return name
        if len(self.databases) == 1:
            return next(iter(self.databases))
        raise ConfigError(f"several databases are configured ({', '.join(self.databases)}); name one with --db")

    def location_names(self, only: str | None = None) -> list[str]:
        if only is None:
            return list(self.locations)
        if only not in self.locations:
            raise ConfigError(f"no location named {only!r} in the config; configured: {', '.join(self.locations)}")
        return [only]


def _cycle(after: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in after.get(node, []):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in after:
        if node not in state and (found := visit(node)):
            return found
    return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if len(loc) > 2 and loc[0] in ("locations", "alerts") and e["type"] != "union_tag_invalid":
            del loc[2]  # pydantic puts the union's tag (the `type`) in the path; YAML has no such level
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {msg}")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None, sandbox: bool = False) -> DrConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        cfg = DrConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    cfg = cfg.model_copy(update={"base_dir": (base_dir or Path.cwd()).resolve(), "sandbox": sandbox})
    seen: dict[tuple, str] = {}  # two names for one place would count one copy twice
    for name, loc in cfg.locations.items():
        if isinstance(loc, LocalLocationConfig):
            where: tuple = ("local", loc.resolved_path(cfg.base_dir).resolve())
        else:
            where = (loc.type, getattr(loc, "endpoint_url", None), loc.bucket, loc.prefix.strip("/"))
        if where in seen:
            raise ConfigError(
                f"invalid configuration in {source}:\n  locations.{name}: the same place as "
                f"locations.{seen[where]}: one copy, not two; give each location its own "
                "directory, bucket or prefix"
            )
        seen[where] = name
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently: two
    `local:` locations would lose the first without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key!r} appears twice in one mapping (first on line {seen[key] + 1}); keep one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike, sandbox: bool = False) -> DrConfig:
    """The config in a YAML file. (With no file, the entry points fall back to the embedded sandbox:
    `dr_pipelines.sandbox.config.config_and_file`.)"""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    return parse_config(data, source=str(p), base_dir=p.resolve().parent, sandbox=sandbox)
