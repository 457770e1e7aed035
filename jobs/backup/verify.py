"""Prove that a backup is what its manifest says: one read of the archive, every member checked.

A flipped byte anywhere changes the archive's SHA-256; inside a member it also changes
that member's hash (or breaks decompression). Either way the verification fails and says
where, and the result is recorded in the backup's ``status.json`` for the exporter.

A format-3 backup with no archive of its own (nothing new was stored) is verified by its
references: every pack it names is in the backup directory, holds each content the manifest
names it for with its size, and passed its own verification with its archive still there at
its size (a pack never verified is read now, as its backup's verification would have, and
the result recorded on it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.jobs.backup.tarstream import CHUNK_BYTES, ArchiveDigest, ArchiveError, MemberData, members

from mlwarden.catalog import PACK, BackupEntry, Catalog, CatalogError, LinkRecord, Verification

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


def pack_references(entry: BackupEntry, packs: dict[str, BackupEntry]) -> list[str]:
    """Every content the manifest names a pack for is a member of that pack (in ``packs``, by name), with its size."""
    problems = []
    held = {name: {(r.sha256, r.size) for r in pack.manifest.files} for name, pack in packs.items()}
    for name in entry.manifest.packs:
        if name not in held:
            living = sum(r.pack == name for r in entry.manifest.files)
            problems.append(f"pack {name} is missing or unreadable: {living} file(s) of this backup live in it")
            continue
        lacking = [r.path for r in entry.manifest.files if r.pack == name and (r.sha256, r.size) not in held[name]]
        if lacking:
            problems.append(f"pack {name} does not hold the content of {len(lacking)} file(s), e.g. {lacking[0]!r}")
    return problems


def verify_references(entry: BackupEntry) -> VerifyResult:
    """A backup without an archive of its own: every pack it names is here, holds what the
    manifest names it for, and is verified (one never verified is read now). Never raises for damage."""
    packs: dict[str, BackupEntry] = {}
    problems: list[str] = []
    for name in entry.manifest.packs:
        try:
            packs[name] = Catalog.read_pack(entry.directory.parent / name)
        except (OSError, CatalogError) as exc:
            if (entry.directory.parent / name / PACK).exists():  # a missing one is reported below
                problems.append(f"pack {name} is unreadable: {exc}")
    problems += pack_references(entry, packs)
    read = 0
    for name, pack in sorted(packs.items()):
        if problems:
            break
        verification = pack.status.verification
        if verification is not None and not verification.ok:
            problems.append(f"pack {name} failed its verification ({verification.detail})")
        elif verification is not None:  # verified when it was made: still there, whole?
            size = pack.archive_path.stat().st_size if pack.archive_path.is_file() else None
            if size != pack.manifest.archive_bytes:
                problems.append(f"pack {name}: archive {pack.manifest.archive} is missing or has {size} bytes, not {pack.manifest.archive_bytes}")
        else:  # recorded on the pack: the next backup that names it need not read it again
            result = verify_archive(pack)
            read += result.archive_bytes
            Catalog.update_status(pack, verification=verification_of(result))
            if not result.ok:
                problems.append(f"pack {name}: {result.detail}")
    if problems:
        return VerifyResult(False, "; ".join(problems), 0, read)
    files = len(entry.manifest.files)
    return VerifyResult(True, f"no archive of its own: {files} files found in {len(packs)} verified pack(s)", files, read)


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


def verify_and_record(entry: BackupEntry) -> tuple[BackupEntry, VerifyResult]:
    """Verify, log the outcome and record it in the catalog."""
    started = time.monotonic()
    result = verify_archive(entry) if entry.manifest.has_archive else verify_references(entry)
    log_verification(entry.name, result, time.monotonic() - started)
    entry = Catalog.update_status(entry, verification=verification_of(result))
    return entry, result


def verification_of(result: VerifyResult) -> Verification:
    """What the catalog records of a verification made now."""
    return Verification(checked_at=time.time(), ok=result.ok, detail=result.detail)


def log_verification(name: str, result: VerifyResult, seconds: float | None = None) -> None:
    """The outcome, for the operator; ``seconds`` is None for a verification made while the backup was written."""
    if result.ok:
        log.info("verified %s%s: %s", name, "" if seconds is None else f" in {seconds:.1f}s", result.detail)
    else:
        log.error("backup %s FAILED verification: %s", name, result.detail)
