"""Settings and commands of ``mlwarden backup`` and ``mlwarden restore``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlwarden.jobs.backup.archive import LEVEL_RANGES
from mlwarden.jobs.backup.job import run_backup, run_restore
from mlwarden.jobs.backup.retention import Policy
from mlwarden.jobs.backup.s3config import STORAGE_CLASSES, S3Location
from mlwarden.jobs.report import PUSHGATEWAY_ENV, expected_interval_setting, grace_setting, late_severity_setting, timeout_setting

from mlwarden.command import Command
from mlwarden.settings import in_range, parse_duration, parse_size, parse_url, positive, setting

_COUNT = in_range(int, 0, 100_000)


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    s3_bucket: str | None = setting(
        None,
        help="S3 bucket for the off-site copy (credentials: the standard AWS environment, config files or instance role)",
        env=("S3_BUCKET",),
    )
    s3_prefix: str = setting("", help="key prefix inside the bucket, e.g. backups/gpu-node-1")
    s3_endpoint_url: str | None = setting(None, help="endpoint of an S3-compatible store (MinIO, Ceph, R2...); default AWS", parse=parse_url)
    s3_attempts: int = setting(
        3,
        help="attempts for each S3 request (botocore's standard retry mode, with its jittered backoff)",
        parse=positive(int),
    )
    s3_retry_base: float = setting(
        2.0,
        help="first backoff before a whole copy is tried again after its check failed (doubles each time, full jitter)",
        parse=parse_duration,
    )

    def s3_location(self, storage_class: str = "STANDARD", chunk_size: int = 64 * 2**20, concurrency: int = 8) -> S3Location | None:
        if not self.s3_bucket:
            return None
        return S3Location(
            bucket=self.s3_bucket,
            prefix=self.s3_prefix,
            endpoint_url=self.s3_endpoint_url,
            storage_class=storage_class,
            chunk_size=chunk_size,
            concurrency=concurrency,
            attempts=self.s3_attempts,
            retry_base_seconds=self.s3_retry_base,
        )


# Field order is table order: the core fields first, then the S3 ones, then the rest
# (dataclasses collect fields from the last base class to the first).
@dataclass(frozen=True, kw_only=True)
class _BackupCore:
    model_dir: Path = setting(help="directory to back up (model weights, configs)", env=("MODEL_DIR",))
    backup_dir: Path = setting(help="directory that holds the backups (the catalog)", env=("BACKUP_DIR",))
    compression: str = setting("zstd", help="archive compression; gzip only for compatibility, it is far slower", choices=("zstd", "gzip", "none"))
    level: int | None = setting(
        None,
        help="compression level: zstd 1-19 (default 1: higher levels gain next to nothing on float weights), gzip 1-9 (default 6); ignored for none",
        env=("COMPRESSION_LEVEL",),
    )
    threads: int = setting(0, help="zstd worker threads; 0 means one per core", parse=in_range(int, 0, 256))
    verify: bool = setting(True, help="re-read the new archive and check it against the manifest", env=("VERIFY_BACKUP",))
    period: str = setting(
        "day",
        help="one backup per UTC day or hour: a second run in the same period verifies the existing backup and stops; 'run' backs up every run",
        choices=("day", "hour", "run"),
    )
    force: bool = setting(False, help="make a new backup even if one exists for this period")
    exclude: list[str] = setting(
        help="leave out what matches this glob, on purpose (repeatable; recorded in the manifest): matched against the path "
        "relative to --model-dir (* also matches /), and against the base name when it has no /, e.g. '*.tmp' or 'scratch/*'; "
        "the variable takes a comma-separated list",
        default_factory=list, metavar="GLOB",
    )


@dataclass(frozen=True, kw_only=True)
class BackupSettings(S3Settings, _BackupCore):
    s3_storage_class: str = setting(
        "STANDARD",
        help="storage class of the uploaded archive; GLACIER-like classes are verified by checksum metadata, not by download",
        choices=STORAGE_CLASSES,
    )
    s3_chunk_size: int = setting(
        64 * 2**20,
        help="multipart part size, e.g. 64MiB (grown automatically to stay under 10,000 parts)",
        parse=parse_size,
    )
    s3_concurrency: int = setting(8, help="parallel part uploads", parse=positive(int))
    s3_retention: bool = setting(False, help="apply the keep rules to the backups in S3 too")
    keep_last: int | None = setting(None, help="keep the N newest backups", parse=_COUNT)
    keep_daily: int | None = setting(
        None,
        help="keep the newest backup of each of the N newest days that have backups (RETENTION_DAYS=N is read as this)",
        env=("RETENTION_DAYS",),
        parse=_COUNT,
    )
    keep_weekly: int | None = setting(None, help="keep the newest backup of each of the N newest ISO weeks that have backups", parse=_COUNT)
    keep_monthly: int | None = setting(None, help="keep the newest backup of each of the N newest months that have backups", parse=_COUNT)
    dry_run: bool = setting(False, help="say what would be backed up and deleted; touch nothing", env=("DRY_RUN",))
    pushgateway: str | None = setting(None, help="Pushgateway URL for the job's metrics", env=(PUSHGATEWAY_ENV,), parse=parse_url)
    textfile_dir: Path | None = setting(None, help="write the job's metrics here for node_exporter's textfile collector")
    expected_interval: float = expected_interval_setting("1d")
    grace: float = grace_setting("1h")
    timeout: float = timeout_setting("6h")
    late_severity: str = late_severity_setting("critical")

    def __post_init__(self) -> None:
        if self.level is not None and self.compression in LEVEL_RANGES:
            low, high = LEVEL_RANGES[self.compression]
            if not low <= self.level <= high:
                raise ValueError(f"--level/COMPRESSION_LEVEL={self.level}: {self.compression} levels are {low} to {high}")

    @property
    def policy(self) -> Policy:
        return Policy(self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly)

    @property
    def offsite(self) -> S3Location | None:
        return self.s3_location(self.s3_storage_class, self.s3_chunk_size, self.s3_concurrency)


@dataclass(frozen=True, kw_only=True)
class _RestoreCore:
    name: str = setting("latest", help="backup to restore: its name, or latest", positional=True, metavar="NAME")
    to: Path | None = setting(None, help="directory to restore into (created; must be empty unless --force)")
    backup_dir: Path | None = setting(None, help="directory that holds the backups (not needed with --from-s3)", env=("BACKUP_DIR",))
    from_s3: bool = setting(False, help="restore from the S3 copy instead of the local backup directory")
    drill: bool = setting(False, help="restore into a temporary directory, verify every file, time it, delete it and push the drill metrics")
    lock_wait: float = setting(
        2 * 3600.0,
        help="how long a drill waits for a backup run that holds the backup lock (BACKUP_DIR/.mlwarden-backup.lock), e.g. 30m; after "
        "that it fails; 0 fails at once",
        parse=parse_duration,
    )
    force: bool = setting(False, help="replace the content of a non-empty --to directory (after the new content is complete and verified)")
    restore_external_links: bool = setting(
        False,
        help="also restore symlinks that point outside --to (absolute, or up out of it); by default they are listed in the log and left out",
    )


@dataclass(frozen=True, kw_only=True)
class RestoreSettings(S3Settings, _RestoreCore):
    pushgateway: str | None = setting(None, help="Pushgateway URL for the drill's metrics", env=(PUSHGATEWAY_ENV,), parse=parse_url)
    textfile_dir: Path | None = setting(None, help="write the drill's metrics here for node_exporter's textfile collector")
    # The heartbeat is the drill's: a plain restore pushes nothing.
    expected_interval: float = expected_interval_setting("7d")
    grace: float = grace_setting("1d")
    timeout: float = timeout_setting("6h")
    late_severity: str = late_severity_setting("warning")

    def __post_init__(self) -> None:
        if not self.drill and self.to is None:
            raise ValueError("--to is required (the directory to restore into), unless --drill")
        if self.from_s3 and not self.s3_bucket:
            raise ValueError("--from-s3 needs --s3-bucket (or S3_BUCKET)")
        if not self.from_s3 and self.backup_dir is None:
            raise ValueError("--backup-dir (or BACKUP_DIR) is required, unless --from-s3")
        if self.from_s3 and self.drill and self.to is None and self.backup_dir is None:
            raise ValueError("a drill from S3 needs --backup-dir or --to: somewhere with room for the download")


@dataclass(frozen=True, kw_only=True)
class BackupListSettings:
    backup_dir: Path = setting(help="directory that holds the backups (the catalog)", env=("BACKUP_DIR",))
    json: bool = setting(False, help="print a JSON array (one object per backup, oldest first) instead of a table")


@dataclass(frozen=True, kw_only=True)
class BackupCheckSettings:
    backup_dir: Path = setting(help="directory that holds the backups (the catalog)", env=("BACKUP_DIR",))
    read_data: bool = setting(False, help="also read every byte of every archive: the archive's SHA-256 and every file's against the manifest")


# The inventory is imported by its commands only: a backup does not load it.
def _list(settings: BackupListSettings) -> int:
    from mlwarden.jobs.backup.inventory import list_backups

    return list_backups(settings.backup_dir, settings.json)


def _check(settings: BackupCheckSettings) -> int:
    from mlwarden.jobs.backup.inventory import run_check

    return run_check(settings.backup_dir, settings.read_data)


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "backup", "attribute": "BACKUP", "help": "archive, checksum, verify and copy models off-site; apply retention",
     "heartbeat": "backup", "maintain": {"order": 20, "env": "RUN_BACKUP"}},
    {"name": "backup-list", "attribute": "BACKUP_LIST", "help": "list the backups: time, files, bytes, verified, off-site (table or --json)"},
    {"name": "backup-check", "attribute": "BACKUP_CHECK",
     "help": "check that every piece of every backup is there; --read-data reads and hashes every byte"},
    {"name": "restore", "attribute": "RESTORE", "help": "restore a backup (local or S3), or run a restore drill",
     "heartbeat": "restore_drill"},
)

BACKUP = Command(
    "backup",
    settings=BackupSettings,
    run=run_backup,
    description=(
        "Back up MODEL_DIR into BACKUP_DIR in one pass (tar, zstd/gzip, SHA-256 per file and per archive), "
        "verify it, copy it to S3 and apply the keep rules. One backup per UTC day by default."
    ),
)

RESTORE = Command(
    "restore",
    settings=RestoreSettings,
    run=run_restore,
    description=(
        "Restore backup NAME (default latest) into --to, from BACKUP_DIR or from S3: the archive hash is checked "
        "before extraction and every file after; the target changes only when all is good. --drill proves the "
        "latest backup restorable and pushes the result as metrics."
    ),
)

BACKUP_LIST = Command(
    "backup-list",
    settings=BackupListSettings,
    run=_list,
    description="List the backups in BACKUP_DIR, oldest first: name, start (UTC), files, total and stored bytes, last verification, off-site copy.",
)

BACKUP_CHECK = Command(
    "backup-check",
    settings=BackupCheckSettings,
    run=_check,
    description=(
        "Check every backup in BACKUP_DIR without changing it: each manifest parses, each archive is there with its size, "
        "its .sha256 and SHA256SUMS match the manifest; with --read-data every byte is read and every file hashed. "
        "Exits 1 naming each problem."
    ),
)
