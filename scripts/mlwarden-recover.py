#!/usr/bin/env python3
"""Rebuild an mlwarden backup without mlwarden: Python's standard library, tar, zstd.

    python3 mlwarden-recover.py BACKUP/<name> TARGET

BACKUP/<name> is one backup's directory (manifest.json, the archive, its .sha256,
SHA256SUMS), local or downloaded from S3 (`aws s3 cp --recursive`). TARGET must not exist.
The steps are the ones docs/backups.md gives by hand:

1. the archive's SHA-256 must be the one in manifest.json (and in <archive>.sha256);
2. GNU tar extracts it into TARGET (zstd decompresses .tar.zst; tar itself refuses
   absolute names and '..');
3. every file of the manifest must be in TARGET with its size and SHA-256, every symlink
   with its target, and nothing else may be there.

Format 3 (content stored once): the manifest names, for each file, the pack (a backup
directory next to BACKUP/<name>, with pack.json) whose archive holds its content. Each pack
is checked as in 1 against its pack.json and extracted into a scratch directory next to
TARGET; each file of the manifest is copied from the member with its SHA-256, each hard
link the manifest lists is made to the file it names, the symlinks are made from the
manifest, and 3 holds as above (hard links joined, link for link). A backup that stored
nothing new has no pack of its own (its manifest's "archive" is ""): all of its files are
in earlier packs.

Exit 0 when TARGET holds exactly the backup; 1 naming what is wrong. Only the standard
library: this file is meant to be copied next to the backups and run on a bare machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Any

CHUNK = 8 * 2**20
EXTRACT = {
    "zstd": "zstd -dc -- {archive} | tar -xf - --no-same-owner -C {target}",
    "gzip": "tar -xzf {archive} --no-same-owner -C {target}",
    "none": "tar -xf {archive} --no-same-owner -C {target}",
}


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"


def safe(name: str) -> bool:
    return bool(name) and not name.startswith("/") and ".." not in name.split("/")


def extracted(target: str) -> set[str]:
    """Every file and symlink under ``target``, relative, '/'-separated."""
    found = set()
    for directory, subdirs, files in os.walk(target):
        relative = os.path.relpath(directory, target)
        for name in files + [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
            found.add(name if relative == "." else f"{relative}/{name}".replace(os.sep, "/"))
    return found


def check_tree(manifest: dict[str, Any], target: str) -> list[str]:
    problems = []
    expected = set()
    for record in manifest["files"]:
        expected.add(record["path"])
        path = os.path.join(target, record["path"])
        if os.path.islink(path) or not os.path.isfile(path):
            problems.append(f"{record['path']}: missing")
        elif os.path.getsize(path) != record["size"]:
            problems.append(f"{record['path']}: {os.path.getsize(path)} bytes, the manifest says {record['size']}")
        elif sha256(path) != record["sha256"]:
            problems.append(f"{record['path']}: SHA-256 does not match the manifest")
    for link in manifest.get("links", ()):
        expected.add(link["path"])
        path = os.path.join(target, link["path"])
        if not os.path.islink(path) or os.readlink(path) != link["target"]:
            problems.append(f"{link['path']}: not the symlink to {link['target']} the manifest lists")
    for hardlink in manifest.get("hardlinks", ()):
        path, other = os.path.join(target, hardlink["path"]), os.path.join(target, hardlink["target"])
        if not (os.path.isfile(path) and os.path.isfile(other) and os.path.samefile(path, other)):
            problems.append(f"{hardlink['path']}: not the hard link to {hardlink['target']} the manifest lists")
    problems += [f"{name}: not in the manifest" for name in sorted(extracted(target) - expected)]
    return problems


def load(path: str) -> dict[str, Any]:
    with open(path, "rb") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def checked_archive(directory: str, index: dict[str, Any], what: str) -> tuple[str, list[str]]:
    """The path of the archive ``index`` (a manifest or pack.json) describes, and what is wrong with it."""
    archive = index["archive"]
    if "/" in archive or archive.startswith(".") or index["compression"] not in EXTRACT:
        return "", [f"{what} names an unexpected archive {archive!r} ({index['compression']!r})"]
    archive_path = os.path.join(directory, archive)
    actual = sha256(archive_path)
    if actual != index["archive_sha256"]:
        return "", [f"{archive}: SHA-256 {actual} is not the {what}'s {index['archive_sha256']}: the archive is damaged"]
    with open(archive_path + ".sha256", encoding="utf-8") as handle:
        if handle.read().split()[0].lstrip("\\") != actual:
            return "", [f"{archive}.sha256 does not match the archive"]
    return archive_path, []


def extract(archive_path: str, compression: str, target: str) -> None:
    os.makedirs(target)
    command = EXTRACT[compression].format(archive=quote(archive_path), target=quote(target))
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)


def recover(backup: str, target: str) -> list[str]:
    manifest = load(os.path.join(backup, "manifest.json"))
    hardlinks = manifest.get("hardlinks", ())
    names = [r["path"] for r in (*manifest["files"], *manifest.get("links", ()), *hardlinks)] + [h["target"] for h in hardlinks]
    unsafe = [name for name in names if not safe(name)]
    if unsafe:
        return [f"manifest.json lists unsafe paths, e.g. {unsafe[0]!r}"]
    if manifest.get("format_version", 1) >= 3:
        return recover_packs(backup, manifest, target)
    archive_path, problems = checked_archive(backup, manifest, "manifest")
    if problems:
        return problems
    extract(archive_path, manifest["compression"], target)
    return check_tree(manifest, target)


def recover_packs(backup: str, manifest: dict[str, Any], target: str) -> list[str]:
    """Format 3: check every pack first (nothing is extracted if one is damaged), extract
    them into a scratch directory, then copy each file's content to its path."""
    root = os.path.dirname(os.path.abspath(backup))
    own = {manifest["name"]} if manifest["archive"] else set()  # "": nothing new was stored, no pack of its own
    names = sorted({r["pack"] for r in manifest["files"]} | own)
    if any(not safe(name) or "/" in name or name.startswith(".") for name in names):
        return ["manifest.json names a pack that is not a directory name"]
    members: dict[tuple[str, str], str] = {}  # (pack, SHA-256) -> member path
    archives = {}
    for name in names:
        pack = load(os.path.join(root, name, "pack.json"))
        if pack["name"] != name or any(not safe(r["path"]) for r in pack["files"]):
            return [f"{name}/pack.json does not describe pack {name}"]
        archives[name], problems = checked_archive(os.path.join(root, name), pack, f"{name}/pack.json")
        if problems:
            return problems
        for record in pack["files"]:
            members[(name, record["sha256"])] = record["path"]
        archives[name + "/compression"] = pack["compression"]
    lacking = [r["path"] for r in manifest["files"] if (r["pack"], r["sha256"]) not in members]
    if lacking:
        return [f"{len(lacking)} file(s) have no member in their pack, e.g. {lacking[0]!r}"]
    scratch = os.path.join(os.path.dirname(os.path.abspath(target)), "." + os.path.basename(target) + ".packs")
    os.makedirs(target)
    try:
        for name in names:
            extract(archives[name], archives[name + "/compression"], os.path.join(scratch, name))
        hardlinks = {h["path"]: h["target"] for h in manifest.get("hardlinks", ())}
        for record in manifest["files"]:
            if record["path"] in hardlinks:
                continue
            destination = os.path.join(target, record["path"])
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.copyfile(os.path.join(scratch, record["pack"], members[(record["pack"], record["sha256"])]), destination)
            os.chmod(destination, record.get("mode", 0o644) & 0o777)
            os.utime(destination, (record["mtime"], record["mtime"]))
        for path, other in hardlinks.items():
            destination = os.path.join(target, path)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.link(os.path.join(target, other), destination, follow_symlinks=False)
        for link in manifest.get("links", ()):
            destination = os.path.join(target, link["path"])
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.symlink(link["target"], destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return check_tree(manifest, target)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    backup, target = argv
    if os.path.lexists(target):
        print(f"{target} exists: recover into a new directory", file=sys.stderr)
        return 2
    try:
        problems = recover(backup, target)
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    for problem in problems:
        print(f"mlwarden-recover: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"recovered {backup} into {target}: every file and link matches the manifest, nothing else is there")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
