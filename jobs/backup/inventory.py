"""``mlwarden backup-list`` and ``mlwarden backup-check``: what a backup directory holds, and
whether every piece of it is still there and still what its manifest says.

Both only read: a check records nothing in ``status.json`` (it may run as a user who can read
the backups but not write them); ``mlwarden backup`` and the drill are what record a
verification. ``backup-check`` without ``--read-data`` proves that every reference resolves
(each manifest parses, its archive exists with the size the manifest gives, the
``.sha256`` line and ``SHA256SUMS`` say what the manifest says); with ``--read-data`` every
byte of every archive is also read, the archive hashed and every member hashed against the
manifest, as restic's ``check --read-data``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlwarden.jobs.backup.archive import sha256sum_line
from mlwarden.jobs.backup.verify import pack_references, verify_archive

from mlwarden.catalog import CHECKSUMS, BackupEntry, Catalog
from mlwarden.exitcodes import ExitCode
from mlwarden.terminal import human_bytes

log = logging.getLogger(__name__)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def describe(entry: BackupEntry, referenced_by: tuple[str, ...] = ()) -> dict[str, Any]:
    """One backup (or, with ``referenced_by``, a pruned backup's pack) as ``backup-list --json`` gives it."""
    manifest, status = entry.manifest, entry.status
    offsite = status.offsite
    # A pack's own view (Catalog.read_pack); a backup without an archive of its own is no pack.
    is_pack = entry.pack is None and manifest.format_version >= 3 and manifest.has_archive
    row: dict[str, Any] = {
        "kind": "pack" if is_pack else "backup",
        "name": entry.name,
        "started_at": None if is_pack else _utc(manifest.started_at),
        "files": len(manifest.files),
        "links": len(manifest.links),
        "total_bytes": manifest.total_bytes,
        "new_bytes": entry.pack.new_bytes if entry.pack is not None else manifest.total_bytes if manifest.has_archive else 0,
        "stored_bytes": manifest.archive_bytes,
        "verified": entry.verified,
        "verified_at": _utc(status.verification.checked_at) if status.verification else None,
        "offsite": None if offsite is None else {"bucket": offsite.bucket, "key": offsite.key, "verified": offsite.verified},
    }
    if is_pack:
        row["referenced_by"] = list(referenced_by)
    else:
        row["packs"] = list(manifest.packs)
    return row


def _verified_text(verified: bool | None) -> str:
    return {True: "yes", False: "FAILED", None: "never"}[verified]


def _offsite_text(offsite: dict[str, Any] | None) -> str:
    if offsite is None:
        return "no"
    return f"s3://{offsite['bucket']}/{offsite['key']}" + ("" if offsite["verified"] else " (unchecked)")


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns, one backup a line, oldest first."""
    header = ("NAME", "STARTED", "FILES", "TOTAL", "NEW", "STORED", "VERIFIED", "OFF-SITE")
    cells = [header] + [
        (
            r["name"], r["started_at"] or "(pack)", str(r["files"]), human_bytes(r["total_bytes"]), human_bytes(r["new_bytes"]),
            human_bytes(r["stored_bytes"]), _verified_text(r["verified"]), _offsite_text(r["offsite"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in cells)


def list_backups(backup_dir: Path, as_json: bool) -> int:
    unreadable: list[str] = []
    catalog = Catalog(backup_dir)

    def report(directory: Path, exc: Exception) -> None:
        unreadable.append(f"{directory}: {exc}")

    entries = catalog.entries(on_unreadable=report)
    rows = [describe(entry) for entry in entries]
    pruned = {directory.name for directory in catalog.pack_only()}
    for pack in catalog.packs(on_unreadable=report):
        if pack.name in pruned:
            rows.append(describe(pack, tuple(e.name for e in entries if pack.name in e.manifest.packs)))
    sys.stdout.write(json.dumps(rows, indent=1) + "\n" if as_json else table(rows))
    for problem in unreadable:
        log.error("unreadable backup %s", problem)
    return ExitCode.FAILURE if unreadable else ExitCode.OK


def references(entry: BackupEntry, packs: dict[str, BackupEntry] | None = None) -> list[str]:
    """What is wrong with the pieces of one backup (or pack), without reading its archive's
    content; with ``packs`` (by name), also every pack reference of a format-3 backup."""
    stored = entry.stored()
    manifest = stored.manifest
    problems = []
    expected = {}
    if manifest.has_archive:
        try:
            size = entry.archive_path.stat().st_size
            if size != manifest.archive_bytes:
                problems.append(f"archive {manifest.archive} has {size} bytes, the manifest says {manifest.archive_bytes}")
        except FileNotFoundError:
            problems.append(f"archive {manifest.archive} is missing")
        expected[entry.archive_path.with_name(manifest.archive + ".sha256")] = sha256sum_line(manifest.archive_sha256, manifest.archive)
    if packs is not None:
        expected[entry.directory / CHECKSUMS] = "".join(sha256sum_line(f.sha256, f.path) for f in entry.manifest.files)
    for path, text in expected.items():
        try:
            if path.read_bytes() != text.encode("utf-8", "surrogateescape"):
                problems.append(f"{path.name} does not match the manifest")
        except FileNotFoundError:
            problems.append(f"{path.name} is missing")
    if entry.manifest.format_version >= 3 and packs is not None:
        problems += pack_references(entry, packs)
    return problems


@dataclass(frozen=True)
class CheckResult:
    checked: int
    problems: tuple[str, ...]


def check_backups(backup_dir: Path, read_data: bool) -> CheckResult:
    """Every backup under ``backup_dir``: its references, and with ``read_data`` every byte."""
    catalog = Catalog(backup_dir)
    problems: list[str] = []

    def unreadable(directory: Path, exc: Exception) -> None:
        problems.append(f"{directory.name}: unreadable: {exc}")

    entries = catalog.entries(on_unreadable=unreadable)
    packs = {pack.name: pack for pack in catalog.packs(on_unreadable=unreadable)}
    problems += [f"{directory.name}: no manifest.json (not a backup; restorable by hand only)" for directory in catalog.incomplete()]
    pruned = {directory.name for directory in catalog.pack_only()}
    # A pruned backup's pack is checked as a pack: its archive, and with --read-data its bytes.
    for entry in entries + [pack for name, pack in packs.items() if name in pruned]:
        found = references(entry, None if entry.name in pruned else packs)
        if read_data and not found and entry.manifest.has_archive:  # one without stores nothing: its packs are read as theirs
            result = verify_archive(entry)
            if not result.ok:
                found.append(result.detail)
        problems += [f"{entry.name}: {problem}" for problem in found]
        if not found:
            log.info("%s: ok (%s)", entry.name, "every byte read and hashed" if read_data else "every reference resolves")
    return CheckResult(len(entries), tuple(problems))


def run_check(backup_dir: Path, read_data: bool) -> int:
    if not backup_dir.is_dir():
        log.error("backup directory %s does not exist", backup_dir)
        return ExitCode.USAGE
    result = check_backups(backup_dir, read_data)
    for problem in result.problems:
        log.error("check FAILED: %s", problem)
    what = "every byte read and hashed" if read_data else "references only; --read-data reads every byte"
    if result.problems:
        log.error("%d problem(s) in %d backup(s) of %s (%s)", len(result.problems), result.checked, backup_dir, what)
        return ExitCode.FAILURE
    log.info("%d backup(s) of %s are sound (%s)", result.checked, backup_dir, what)
    return ExitCode.OK
