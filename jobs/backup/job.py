"""The backup run and the restore run: what happens, in which order, and what is reported.

Backup, under the job lock in BACKUP_DIR:

1. remove what killed runs left (staging directories whose process is gone); report, and
   leave alone, visible directories without a manifest;
2. if a backup of this source exists for the current period (UTC day by default), verify it,
   make sure its off-site copy exists, apply retention and stop (unless ``--force``);
3. otherwise archive in one pass, commit the manifest, verify, copy off-site, apply retention.

Exit 0 when everything asked for succeeded; 1 on any failure, including an S3 failure after a
good local backup (the local backup is kept, and the log and the metrics say so). SIGINT and
SIGTERM stop a backup, a restore or a drill: partial work is removed, the failure is pushed,
and ``mlwarden`` exits 130 (SIGINT) or 143 (SIGTERM).

A restore drill takes the same lock, so that a backup's retention cannot delete the archive
the drill is reading. A drill that finds a backup running waits for it (``--lock-wait``,
default 2 h: then it checks the backup just made) and fails if it is still running by then;
a backup that finds a drill running fails at once, like one that finds another backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlwarden.jobs.backup import archive, dedup, prune, retention
from mlwarden.jobs.backup.follow import Follower
from mlwarden.jobs.backup.s3config import OffsiteError, S3Location
from mlwarden.jobs.backup.tarstream import ArchiveError
from mlwarden.jobs.backup.verify import VerifyResult, log_verification, verification_of, verify_and_record, verify_references
from mlwarden.jobs.report import JobReport, schedule_of

from mlwarden.catalog import (
    BACKUP_DIR_STAGING,
    BACKUP_STAGING,
    DRILL_STAGING,
    FORMAT_VERSION,
    STATUS,
    BackupEntry,
    Catalog,
    CatalogError,
    Manifest,
    Pack,
    Status,
    staging_dir,
    stale_staging,
)
from mlwarden.exitcodes import ExitCode
from mlwarden.fsutil import StagedFiles, disk_space, fsync_dir
from mlwarden.gcpause import cyclic_gc_paused, kept_until_exit
from mlwarden.interrupts import deferred_interrupts, sigterm_interrupts
from mlwarden.lock import JobLock, LockHeld
from mlwarden.terminal import Progress, human_bytes

if TYPE_CHECKING:
    from mlwarden.jobs.backup.cli import BackupSettings, RestoreSettings
    from mlwarden.jobs.backup.restore import RestoreResult

log = logging.getLogger(__name__)

LOCK_FILE = ".mlwarden-backup.lock"
_LOCK_POLL_SECONDS = 1.0


class BackupFailed(RuntimeError):
    """The backup could not be made; the message is for the operator."""


@dataclass
class Outcome:
    """What a backup run did, for the exit status and the metrics."""

    read_bytes: int = 0
    written_bytes: int = 0
    files: int = 0
    skipped: int = 0  # FIFOs, sockets, devices: listed in the manifest, not archived
    verified: bool | None = None
    offsite_ok: bool | None = None  # None: no S3 configured
    damaged: list[str] = field(default_factory=list)  # existing backups found damaged or unreadable


def backup_name(source: Path, when: float) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name) or "root"
    return f"{slug}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(when))}"


def _period_key(period: str, when: float) -> str | None:
    formats = {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H"}
    return time.strftime(formats[period], time.gmtime(when)) if period in formats else None


# --- backup -------------------------------------------------------------------------------


def run_backup(settings: BackupSettings) -> int:
    with sigterm_interrupts():
        return _run_backup(settings)


def _run_backup(settings: BackupSettings) -> int:
    source = settings.model_dir.absolute()
    if not source.is_dir():
        log.error("model directory %s does not exist or is not a directory", source)
        return ExitCode.USAGE
    if settings.dry_run:
        return _dry_run(settings, source)
    outcome = Outcome()
    code: int = ExitCode.FAILURE
    with JobReport("backup", pushgateway=settings.pushgateway, textfile_dir=settings.textfile_dir, schedule=schedule_of(settings)) as report:
        try:
            with JobLock(settings.backup_dir / LOCK_FILE):  # creates the backup directory if needed
                code = _backup_locked(settings, source, outcome)
        except LockHeld as exc:
            log.error("backup not started: %s", exc)
        except (BackupFailed, OSError) as exc:
            log.error("backup FAILED: %s", exc)
        finally:
            _report_outcome(report, outcome)
        report.succeeded(code == ExitCode.OK)
    return code


def _report_outcome(report: JobReport, outcome: Outcome) -> None:
    report.gauge("mlwarden_backup_read_bytes", "Bytes of model files read by the last backup run.").set(outcome.read_bytes)
    report.gauge("mlwarden_backup_written_bytes", "Bytes of archive written by the last backup run.").set(outcome.written_bytes)
    report.gauge("mlwarden_backup_files", "Files in the backup made or checked by the last run.").set(outcome.files)
    report.gauge(
        "mlwarden_backup_skipped_special_files", "FIFOs, sockets and devices in the model directory: listed in the manifest as skipped, not archived."
    ).set(outcome.skipped)
    report.gauge("mlwarden_backup_verified", "1 if the last run's backup passed verification, else 0.").set(1 if outcome.verified else 0)
    report.gauge(
        "mlwarden_backup_damaged_found", "Existing backups the last run found damaged or unreadable (the run fails while this is above 0)."
    ).set(len(outcome.damaged))
    if outcome.offsite_ok is not None:
        report.gauge("mlwarden_backup_offsite_success", "1 if the last run's off-site copy succeeded, else 0.").set(1 if outcome.offsite_ok else 0)


def _backup_locked(settings: BackupSettings, source: Path, outcome: Outcome) -> int:
    catalog = Catalog(settings.backup_dir)
    remove_stale_staging(settings.backup_dir)
    _report_not_backups(catalog)

    def unreadable(directory: Path, exc: Exception) -> None:
        log.error("backup %s is unreadable (left as it is; this run fails): %s", directory, exc)
        outcome.damaged.append(directory.name)

    entries = catalog.entries(on_unreadable=unreadable)
    entry = None if settings.force else _existing_for_period(entries, source, settings.period, time.time())
    if entry is not None:
        log.info("backup %s already exists for this %s; verifying it (use --force for a new one)", entry.name, settings.period)
        entry, result = verify_and_record(entry)
        if result.ok:
            outcome.files, outcome.skipped, outcome.verified = len(entry.manifest.files), len(entry.manifest.skipped), True
        else:
            log.error("backup %s is damaged (kept for inspection, marked failed); making a new one, and this run fails", entry.name)
            outcome.damaged.append(entry.name)
            entry = None
    if entry is None:
        with cyclic_gc_paused():  # 15-20% of a many-file backup's scan and write, for no cycle
            entry, checked = _create(settings, source, outcome)
        if checked is not None:  # made before the commit, and recorded with it
            log_verification(entry.name, checked)
        elif settings.verify:  # the verifier process died, or the archive was expected to be empty and is not
            entry, checked = verify_and_record(entry)
        outcome.verified = None if checked is None else checked.ok
    ok = outcome.verified is not False
    location = settings.offsite
    if location is not None:
        if ok:
            entry, outcome.offsite_ok = _copy_offsite(entry, location)
        else:
            log.error("not uploading %s: it failed verification", entry.name)
            outcome.offsite_ok = False
        ok = ok and bool(outcome.offsite_ok)
    if not _apply_retention(settings, catalog, source, location):
        ok = False
    return ExitCode.OK if ok and not outcome.damaged else ExitCode.FAILURE


def remove_stale_staging(parent: Path, prefixes: tuple[str, ...] = BACKUP_DIR_STAGING) -> None:
    """Remove the work directories that killed runs left in ``parent``: only ours, by name and dead pid."""
    for directory in stale_staging(parent, prefixes):
        log.warning("removing %s: left behind by a run that was killed", directory)
        shutil.rmtree(directory)


def _report_not_backups(catalog: Catalog) -> None:
    for directory in catalog.incomplete():
        log.warning(
            "%s has no manifest: not a backup, left alone (a backup whose manifest.json was deleted can still be "
            "restored by hand with tar and SHA256SUMS; counted in the exporter's mlwarden_backup_incomplete)", directory,
        )


def _existing_for_period(entries: list[BackupEntry], source: Path, period: str, now: float) -> BackupEntry | None:
    key = _period_key(period, now)
    if key is None:
        return None
    for entry in reversed(entries):
        if entry.manifest.source == str(source) and _period_key(period, entry.manifest.started_at) == key:
            return entry
    return None


def _new_staging(backup_dir: Path, source: Path) -> tuple[Path, str, float]:
    """The staging directory of a backup started now; names have one-second resolution, so a
    second backup within the same second (``--force``) waits for the next one."""
    while True:
        started = time.time()
        name = backup_name(source, started)
        if not (backup_dir / name).exists():
            return staging_dir(backup_dir, BACKUP_STAGING, name), name, started
        time.sleep(1.0 - started % 1.0 + 0.01)


def _create(settings: BackupSettings, source: Path, outcome: Outcome) -> tuple[BackupEntry, VerifyResult | None]:
    """The new backup, committed, and (unless ``--no-verify``) its verification, recorded in its
    ``status.json`` with the commit: made by a process that read the archive while it was
    written (:mod:`~mlwarden.jobs.backup.follow`), or through the packs it names when it has no
    archive of its own. None when there is none: verify the committed backup then.

    Every file of the backup is written unsynced into its staging directory; one
    :meth:`~mlwarden.fsutil.StagedFiles.sync` makes them all durable (their fsyncs overlap),
    then the directory is renamed into place: a crash before the rename leaves no backup, one
    after it a whole one."""
    scan_started_ns = time.time_ns()
    try:
        scanned = archive.scan(source, settings.exclude)
    except archive.SourceUnreadable as exc:
        raise BackupFailed(str(exc)) from None
    total = sum(f.size for f in scanned.files)
    # Read before the staging directory exists: nothing to clean up if they fail or a signal lands.
    index, sizes = dedup.content_index(Catalog(settings.backup_dir))
    cache_file = dedup.cache_path(settings.backup_dir, source)
    cache = dedup.load_cache(cache_file)
    follower = Follower(settings.compression) if settings.verify else None
    cache_saver: threading.Thread | None = None
    staged = StagedFiles()
    try:
        directory: Path | None = None
        try:
            with deferred_interrupts():  # SIGTERM between the mkdir and the assignment would strand the directory
                directory, name, started = _new_staging(settings.backup_dir, source)
            archive_path = directory / archive.archive_name(name, settings.compression)
            known = dedup.Dedup(name, index, cache, scan_started_ns, sizes)
            # Every file unchanged with its content in a pack, and no links: the archive will hold
            # nothing, so no verifier is forked to follow it (if a file changes after all, the
            # archive is verified once written).
            expect_nothing = not scanned.links and all(known.unchanged(f.key) is not None for f in scanned.files)
            following = None if expect_nothing else follower
            log.info("backing up %s (%d files, %d links, %s) to %s", source, len(scanned.files), len(scanned.links), human_bytes(total), archive_path)
            progress = Progress(f"backup {name}", total)
            result = archive.write_archive(
                scanned, archive_path, settings.compression, settings.level, settings.threads, progress.advance, known, following, staged
            )
            progress.finish()
            staged.start()  # the archive's fsync, while the rest is written
            # Nothing new to store (every file's content is in an earlier pack, no links): no
            # pack of its own, so nothing to upload but the manifest, and nothing to verify but its references.
            keep = bool(result.members or scanned.links)
            if not keep:
                archive_path.unlink()
                result = dataclasses.replace(result, archive_bytes=0, sha256="")
            archive.write_checksums(directory, result, staged, archive=keep)
            level = settings.level if settings.level is not None else archive.DEFAULT_LEVELS[settings.compression]
            pack = Pack(
                name=name, compression=settings.compression, level=level, archive=archive_path.name, archive_bytes=result.archive_bytes,
                archive_sha256=result.sha256, files=result.members, links=tuple(scanned.links), rewritten=result.rewritten,
            ) if keep else None
            manifest = Manifest(
                name=name,
                source=str(source),
                host=socket.gethostname(),
                started_at=started,
                finished_at=time.time(),
                compression=settings.compression,
                level=level,
                archive=archive_path.name if keep else "",
                archive_bytes=result.archive_bytes,
                archive_sha256=result.sha256,
                total_bytes=sum(record.size for record in result.files),
                files=result.files,
                links=tuple(scanned.links),
                skipped=tuple(scanned.skipped),
                excludes=tuple(settings.exclude),
                rewritten=result.rewritten,
                format_version=FORMAT_VERSION,
                hardlinks=archive.hard_links(scanned.files, result.files),
            )
            entry = Catalog.commit(directory, manifest, pack, staged)
            staged.start()  # while the verifier finishes
            checked = _verify_staged(entry, following if keep else None, settings.verify)
            if checked is not None:
                entry = dataclasses.replace(entry, status=Status(verification=verification_of(checked)))
                staged.write_bytes(directory / STATUS, entry.status.to_json().encode("utf-8"))
            # The files cache is a hint whose SHA-256s count only where a kept pack holds them,
            # so it may be written before the commit (and stays right if the commit fails): in a
            # thread, while this one waits for the fsyncs and the rename's. Started only now:
            # earlier, its 20-25 ms of CPU (20,000 files) held the GIL away from the commit's work.
            cache_saver = threading.Thread(target=_save_cache, args=(cache_file, known), name="files-cache")
            cache_saver.start()
            staged.sync()
            final = settings.backup_dir / name
            os.rename(directory, final)  # the commit: from here on the backup exists
            fsync_dir(settings.backup_dir)
            entry = dataclasses.replace(entry, directory=final)
        except (OSError, archive.SourceChanged) as exc:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                free = disk_space(settings.backup_dir).available
                raise BackupFailed(
                    f"no space left on the device of {settings.backup_dir} ({human_bytes(free)} free, the models are "
                    f"{human_bytes(total)} before compression); the partial archive was removed and earlier backups are untouched"
                ) from None
            raise BackupFailed(f"{exc}; the partial archive was removed and earlier backups are untouched") from None
        except BaseException:  # interrupted (SIGINT, SIGTERM): leave nothing half-made behind
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        staged.close()
        if follower is not None:
            follower.close()  # kills a verifier left running by an error or a signal
        if cache_saver is not None:
            cache_saver.join()
    seconds = max(manifest.finished_at - started, 1e-9)
    outcome.read_bytes, outcome.written_bytes, outcome.files = result.read_bytes, result.archive_bytes, len(result.files)
    outcome.skipped = len(manifest.skipped)
    log.info(
        "backup %s written in %.1fs: %s of files, %s read (%s/s), %s new in %d file(s), stored in %s",
        name, seconds, human_bytes(manifest.total_bytes), human_bytes(result.read_bytes), human_bytes(result.read_bytes / seconds),
        human_bytes(pack.new_bytes if pack else 0), len(pack.files) if pack else 0, human_bytes(result.archive_bytes),
    )
    return entry, checked


def _verify_staged(entry: BackupEntry, following: Follower | None, verify: bool) -> VerifyResult | None:
    """The verification of the backup in its staging directory: the verifier process's, for an
    archive it followed; the references', for a backup without an archive. None when there is
    none (``--no-verify``, no verifier followed the archive, or it died)."""
    if not verify:
        return None
    if not entry.manifest.has_archive:
        return verify_references(entry)  # the packs it names are in the backup directory, its staging's parent
    return following.result(entry) if following is not None else None


def _save_cache(path: Path, known: dedup.Dedup) -> None:
    """A cache that cannot be written costs the next run its reads, nothing else. A run that
    could trust no file (all written just now) leaves no cache at all."""
    try:
        entries = known.next_cache()
        if entries:
            dedup.save_cache(path, entries)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not write the files cache %s (%s): the next backup reads every file", path, exc.strerror)


def _copy_offsite(entry: BackupEntry, location: S3Location) -> tuple[BackupEntry, bool]:
    offsite = entry.status.offsite
    key = location.copy_key(entry.manifest)
    if offsite is not None and offsite.verified and offsite.bucket == location.bucket and offsite.key == key:
        log.info("%s is already in %s", entry.name, location.url)
        return entry, True
    # botocore's modules and its client's models are most of the objects of a small backup's
    # process and stay to its end: the collector would traverse them again and again. Not the
    # upload: a retried part's traceback can hold its chunk in a cycle.
    with kept_until_exit():
        from mlwarden.jobs.backup.offsite import OffsiteStore  # boto3 loads only when S3 is used

        store = OffsiteStore(location)
    try:
        copy = store.upload(entry)
    except OffsiteError as exc:
        log.error("off-site copy FAILED: %s. The local backup %s is kept (and verified); the job reports failure", exc, entry.directory)
        return entry, False
    return Catalog.update_status(entry, offsite=copy), True


def _candidates(entries: list[BackupEntry]) -> list[retention.Candidate]:
    return [retention.Candidate(e.name, e.manifest.started_at, e.verified) for e in entries]


def _apply_retention(settings: BackupSettings, catalog: Catalog, source: Path, location: S3Location | None) -> bool:
    """Delete what the keep rules do not keep, locally and (optionally) in S3. False on an S3 failure."""
    policy = settings.policy
    if not policy.active:
        prune.collect_garbage(catalog)  # what a prune cut short by kill -9 left
        return True
    local = [e for e in catalog.entries() if e.manifest.source == str(source)]
    doomed = [e for e in local if e.name in retention.decide(_candidates(local), policy).remove]
    for entry in doomed:
        log.info("retention: deleting %s", entry.name)
    prune.delete_backups(catalog, doomed)
    if location is None or not settings.s3_retention:
        return True
    from mlwarden.jobs.backup.offsite import OffsiteStore

    try:
        store = OffsiteStore(location)
        remote = [m for m in store.manifests() if m.source == str(source)]
        # Objects in S3 were checked against their hash on upload: they count as verified.
        decision = retention.decide([retention.Candidate(m.name, m.started_at, True) for m in remote], policy)
        gone = [m for m in remote if m.name in decision.remove]
        for manifest in gone:
            log.info("retention: deleting %s from %s", manifest.name, location.url)
        store.prune(gone)
    except OffsiteError as exc:
        log.error("retention in S3 FAILED: %s", exc)
        return False
    return True


def _dry_run(settings: BackupSettings, source: Path) -> int:
    try:
        files = archive.scan(source, settings.exclude).files
    except archive.SourceUnreadable as exc:
        log.error("dry run: a backup would FAIL: %s", exc)
        return ExitCode.FAILURE
    total = sum(f.size for f in files)
    catalog = Catalog(settings.backup_dir)
    now = time.time()
    for directory in stale_staging(settings.backup_dir, BACKUP_DIR_STAGING):
        log.info("dry run: would remove %s (left behind by a run that was killed)", directory)
    for directory in catalog.incomplete():
        log.info("dry run: %s has no manifest: not a backup, would be left alone", directory)
    existing = None if settings.force else _existing_for_period(catalog.entries(), source, settings.period, now)
    if existing is not None:
        log.info("dry run: backup %s exists for this %s; would verify it and stop", existing.name, settings.period)
    else:
        name = backup_name(source, now)
        log.info(
            "dry run: would back up %d files (%s) from %s to %s", len(files), human_bytes(total), source,
            settings.backup_dir / name / archive.archive_name(name, settings.compression),
        )
    if settings.offsite is not None:
        log.info("dry run: would copy it to %s (storage class %s)", settings.offsite.url, settings.s3_storage_class)
    if settings.policy.active:
        local = [e for e in catalog.entries() if e.manifest.source == str(source)]
        decision = retention.decide(_candidates(local), settings.policy)
        for name in decision.remove:
            log.info("dry run: retention would delete %s", name)
        for name, reasons in decision.keep.items():
            log.info("dry run: retention keeps %s (%s)", name, ", ".join(reasons))
    log.info("dry run: nothing was changed")
    return ExitCode.OK


# --- restore ------------------------------------------------------------------------------


def run_restore(settings: RestoreSettings) -> int:
    with sigterm_interrupts():
        return _run_restore(settings)


def _run_restore(settings: RestoreSettings) -> int:
    # Imported here, not with the module: a backup, which never restores, does not load it.
    from mlwarden.jobs.backup.restore import RestoreError, RestoreStranded

    if settings.drill:
        return _run_drill(settings)
    assert settings.to is not None  # checked by the settings
    try:
        _restore(settings, settings.to, overwrite=settings.force)
    except (RestoreError, ArchiveError, CatalogError, OffsiteError) as exc:
        log.error("restore FAILED: %s. %s was not changed", exc, settings.to)
        return ExitCode.FAILURE
    except (OSError, RestoreStranded) as exc:  # the message names the paths
        log.error("restore FAILED: %s", exc)
        return ExitCode.FAILURE
    return ExitCode.OK


def _restore(settings: RestoreSettings, target: Path, overwrite: bool) -> RestoreResult:
    from mlwarden.jobs.backup.restore import check_target, entry_from_s3, restore_entry

    check_target(target.absolute(), overwrite)
    location = settings.s3_location()
    if settings.from_s3:
        assert location is not None
        # The download goes next to the target, like the restore's staging directory: the
        # disk the operator made room on (for a drill, its scratch directory).
        with entry_from_s3(location, settings.name, target.absolute().parent) as entry, cyclic_gc_paused():
            return restore_entry(entry, target, overwrite, settings.restore_external_links)
    assert settings.backup_dir is not None
    with cyclic_gc_paused():  # reading the manifest and writing the files make many objects and no cycle
        return restore_entry(Catalog(settings.backup_dir).get(settings.name), target, overwrite, settings.restore_external_links)


def _run_drill(settings: RestoreSettings) -> int:
    from mlwarden.jobs.backup.restore import RestoreError

    parent = settings.to or settings.backup_dir
    assert parent is not None  # checked by the settings
    parent.mkdir(parents=True, exist_ok=True)
    with JobReport("restore_drill", pushgateway=settings.pushgateway, textfile_dir=settings.textfile_dir, schedule=schedule_of(settings)) as report:
        duration = report.gauge("mlwarden_restore_drill_duration_seconds", "How long the last restore drill took to restore and verify.")
        verified = report.gauge("mlwarden_restore_drill_verified_files", "Files restored and checked against the manifest by the last drill.")
        try:
            with _backup_lock_for_drill(settings):
                result = _drill(settings, parent)
        except LockHeld as exc:
            log.error("restore drill not started: %s", exc)
            verified.set(0)
            return ExitCode.FAILURE
        except (RestoreError, ArchiveError, CatalogError, OffsiteError, OSError) as exc:
            log.error("restore drill FAILED: %s", exc)
            verified.set(0)
            return ExitCode.FAILURE
        duration.set(result.seconds)
        verified.set(result.files)
        report.succeeded()
        log.info("restore drill passed: %s restored and verified (%d files) in %.1fs", result.name, result.files, result.seconds)
    return ExitCode.OK


def _drill(settings: RestoreSettings, parent: Path) -> RestoreResult:
    remove_stale_staging(parent)
    scratch: Path | None = None
    try:
        with deferred_interrupts():  # SIGTERM between the mkdir and the assignment would strand the directory
            scratch = staging_dir(parent, DRILL_STAGING)
        return _restore(settings, scratch / "restored", overwrite=False)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _backup_lock_for_drill(settings: RestoreSettings) -> Iterator[None]:
    """Hold the backup's lock for the whole drill, so that no backup run (and its retention)
    changes the backup directory, or the S3 prefix, while the drill reads it."""
    if settings.backup_dir is None:  # a drill from S3 into --to: no backup directory, no lock to share
        log.info("restore drill without --backup-dir: it runs without the backup lock")
        yield
        return
    lock = JobLock(settings.backup_dir / LOCK_FILE)
    _acquire_waiting(lock, settings.lock_wait)
    try:
        yield
    finally:
        lock.release()


def _acquire_waiting(lock: JobLock, wait_seconds: float) -> None:
    """Take ``lock``, waiting up to ``wait_seconds`` for its holder; LockHeld if it is still held then."""
    deadline = time.monotonic() + wait_seconds
    waiting = False
    while True:
        try:
            lock.acquire()
            return
        except LockHeld as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockHeld(f"{exc}; gave up after --lock-wait {wait_seconds:.0f}s") from None
            if not waiting:
                log.info("restore drill waiting up to %.0fs for the backup run to finish: %s", wait_seconds, exc)
                waiting = True
            time.sleep(min(_LOCK_POLL_SECONDS, remaining))
