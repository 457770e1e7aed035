"""Prove that a backup is what its manifest says: one read of the archive, every member checked.

A flipped byte anywhere changes the archive's SHA-256; inside a member it also changes
that member's hash (or breaks decompression). Either way the verification fails and says
where, and the result is recorded in the backup's ``status.json`` for the exporter.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.jobs.backup.tarstream import CHUNK_BYTES, ArchiveDigest, ArchiveError, MemberData, members

from mlwarden.catalog import BackupEntry, Catalog, LinkRecord, Verification

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    detail: str
    files: int
    archive_bytes: int


def verify_archive(entry: BackupEntry) -> VerifyResult:
    """Check the archive's hash and every member against the manifest. Never raises for damage."""
    entry = entry.stored()  # format 3: the archive holds the backup's pack, not every file
    manifest = entry.manifest
    digest = ArchiveDigest()
    files = 0
    try:
        with members(entry.archive_path, manifest, digest) as found:
            for record, data in found:
                if isinstance(record, LinkRecord):
                    continue  # a symlink: its target was checked against the manifest
                assert data is not None  # a file's data
                if member_sha256(data, record.size) != record.sha256:
                    raise ArchiveError(f"{record.path}: content does not match its SHA-256 in the manifest")
                files += 1
    except FileNotFoundError:
        return VerifyResult(False, f"archive {entry.archive_path} is missing", files, 0)
    except ArchiveError as exc:
        return VerifyResult(False, str(exc), files, digest.size)
    if digest.sha256 != manifest.archive_sha256 or digest.size != manifest.archive_bytes:
        return VerifyResult(False, "archive SHA-256 or size does not match the manifest", files, digest.size)
    return VerifyResult(True, f"{files} files and the archive hash match the manifest", files, digest.size)


def member_sha256(data: MemberData, size: int) -> str:
    if size < CHUNK_BYTES:  # one read: handing it to the helper thread would cost more than it saves
        digest = hashlib.sha256(data.read())
        while chunk := data.read():
            digest.update(chunk)
        return digest.hexdigest()
    digest = hashlib.sha256()
    with Overlap() as overlap:
        while chunk := data.read():
            overlap.run(digest.update, chunk)
    return digest.hexdigest()


def verify_and_record(entry: BackupEntry, result: VerifyResult | None = None) -> tuple[BackupEntry, VerifyResult]:
    """Verify (unless ``result`` is the verification already made while the archive was
    written), log the outcome and record it in the catalog."""
    started = time.monotonic()
    if result is None:
        result = verify_archive(entry)
    if result.ok:
        log.info("verified %s in %.1fs: %s", entry.name, time.monotonic() - started, result.detail)
    else:
        log.error("backup %s FAILED verification: %s", entry.name, result.detail)
    entry = Catalog.update_status(entry, verification=Verification(checked_at=time.time(), ok=result.ok, detail=result.detail))
    return entry, result
