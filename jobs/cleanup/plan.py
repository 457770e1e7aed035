"""Build the complete cleanup plan before anything is deleted.

The walk goes through directory file descriptors (``openat`` with ``O_NOFOLLOW``), never
follows a symlink, never enters another filesystem (``st_dev`` differs from the root's),
and does not descend into anything kept as a whole (protected, best, keep-marker or
locked directories). A file is planned for deletion when it is a regular file older than
the retention (by mtime), matches no keep rule, and is not among the newest checkpoints of
its run. Locked directories are kept whole here; locked files are found at the moment of
deletion (:mod:`.delete`), where a lock taken after planning also counts. Directories that the plan empties (or that were already empty and
are older than the retention) are removed afterwards; the root itself never is.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from jobs.cleanup import fileops, rules

log = logging.getLogger(__name__)

KEPT_NEW = "newer than retention"
KEPT_PROTECTED = "protected glob"
KEPT_MARKER = "keep marker"
KEPT_BEST = "marked best"
KEPT_CHECKPOINT = "newest checkpoints of the run"
KEPT_LOCKED = "locked (flock)"
KEPT_SYMLINK = "symlink (never followed or removed)"
KEPT_OTHER_FS = "other filesystem"
KEPT_SPECIAL = "not a regular file"
KEPT_UNREADABLE = "unreadable"


class Doomed(NamedTuple):
    """One regular file the plan deletes (a tuple: one is made per old file, so it must be cheap)."""

    relative: str  # '/'-separated, relative to the root
    size: int
    mtime: float
    inode: int
    checkpoint: str | None  # the checkpoint (file or directory) the file belongs to, if any


@dataclass
class RootPlan:
    root: Path
    device: int
    inode: int
    cutoff: float  # files with an mtime before this are old
    files: list[Doomed] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)  # deepest first
    kept: Counter[str] = field(default_factory=Counter)

    @property
    def bytes(self) -> int:
        return sum(item.size for item in self.files)


@dataclass(frozen=True)
class PlanRules:
    cutoff: float
    keep_last_checkpoints: int
    protection: rules.Protection
    keep_marker: str = rules.KEEP_MARKER


@dataclass(frozen=True, slots=True)
class _Directory:
    relative: str
    entries: int
    mtime: float


def build(root: Path, plan_rules: PlanRules) -> RootPlan:
    """Walk ``root`` (already checked by :mod:`.safety`) and return what would be deleted."""
    root_fd = fileops.open_directory(str(root))
    try:
        st = os.fstat(root_fd)
        walker = _Walker(st.st_dev, plan_rules)
        walker.walk(root_fd, "", run="", checkpoint=None)
    finally:
        os.close(root_fd)
    plan = RootPlan(root=root, device=st.st_dev, inode=st.st_ino, cutoff=plan_rules.cutoff, kept=walker.kept)
    kept_checkpoints = walker.newest_checkpoints()
    for candidate in walker.candidates:
        if candidate.checkpoint is not None and candidate.checkpoint in kept_checkpoints:
            plan.kept[KEPT_CHECKPOINT] += 1
        else:
            plan.files.append(candidate)
    plan.directories = _emptied_directories(plan.files, walker.directories, plan_rules.cutoff)
    return plan


def _parent(relative: str) -> str:
    return relative.rpartition("/")[0]


def _emptied_directories(files: list[Doomed], directories: list[_Directory], cutoff: float) -> list[str]:
    """Directories (children before parents) left empty once ``files`` are gone."""
    removed_entries: Counter[str] = Counter(_parent(item.relative) for item in files)
    result = []
    for directory in directories:  # post-order: every child before its parent
        emptied = removed_entries[directory.relative] == directory.entries
        # An empty directory nobody touched lately; a fresh one may be a run that just started.
        if emptied and (directory.entries > 0 or directory.mtime < cutoff):
            result.append(directory.relative)
            removed_entries[_parent(directory.relative)] += 1
    return result


class _Walker:
    def __init__(self, device: int, plan_rules: PlanRules) -> None:
        self.device = device
        self.rules = plan_rules
        self.notable = rules.notable_names(plan_rules.protection)
        self.kept: Counter[str] = Counter()
        self.candidates: list[Doomed] = []
        self.directories: list[_Directory] = []
        # run -> checkpoint -> newest mtime of the checkpoint's files
        self.checkpoints: defaultdict[str, dict[str, float]] = defaultdict(dict)

    def newest_checkpoints(self) -> set[str]:
        keep = self.rules.keep_last_checkpoints
        newest: set[str] = set()
        for found in self.checkpoints.values():
            ordered = sorted(found.items(), key=lambda item: (item[1], item[0]), reverse=True)
            newest.update(name for name, _ in ordered[:keep])
        return newest

    def walk(self, dir_fd: int, relative: str, run: str, checkpoint: str | None) -> tuple[int, float]:
        """Plan one directory; returns its number of entries and the newest file mtime below it.

        This loop runs once per file in the tree, so the common case (an ordinary regular
        file) takes as few steps as possible.
        """
        with os.scandir(dir_fd) as iterator:
            entries = list(iterator)
        if any(entry.name == self.rules.keep_marker for entry in entries):
            self.kept[KEPT_MARKER] += len(entries)
            return len(entries), 0.0
        newest = 0.0
        prefix = relative + "/" if relative else ""
        notable = self.notable.match
        check_paths = self.rules.protection.has_path_globs
        cutoff = self.rules.cutoff
        device = self.device
        kept = self.kept
        keep_young = 0
        plan_file = self.candidates.append
        for entry in entries:
            st = entry.stat(follow_symlinks=False)  # lstat: a symlink is seen as one, never followed
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                kept[KEPT_SYMLINK] += 1
                continue
            if st.st_dev != device:
                kept[KEPT_OTHER_FS] += 1
                continue
            name = entry.name
            if check_paths or notable(name):
                mtime = self._notable(dir_fd, name, prefix + name, st, run if relative else None, checkpoint)
            elif stat.S_ISREG(mode):
                mtime = st.st_mtime
                if mtime >= cutoff:
                    keep_young += 1
                else:
                    plan_file(Doomed(prefix + name, st.st_size, mtime, st.st_ino, checkpoint))
            elif stat.S_ISDIR(mode):
                child = prefix + name
                mtime = self._directory(dir_fd, name, child, st.st_mtime, run if relative else child, checkpoint)
            else:
                kept[KEPT_SPECIAL] += 1
                continue
            if mtime > newest:
                newest = mtime
        if keep_young:
            kept[KEPT_NEW] += keep_young
        return len(entries), newest

    def _notable(self, dir_fd: int, name: str, child: str, st: os.stat_result, run: str | None, checkpoint: str | None) -> float:
        """An entry whose name or path matches a keep rule or the checkpoint patterns."""
        keep_reason = self._kept_by_name(name, child)
        if keep_reason is not None:
            self.kept[keep_reason] += 1
            return st.st_mtime
        is_dir = stat.S_ISDIR(st.st_mode)
        if run is None:  # directly in the root: a directory is a run, a file belongs to the root's own run
            run = child if is_dir else ""
        if checkpoint is None and rules.is_checkpoint(name):
            checkpoint = child
        if is_dir:
            newest = self._directory(dir_fd, name, child, st.st_mtime, run, checkpoint)
        elif stat.S_ISREG(st.st_mode):
            newest = st.st_mtime
            if newest >= self.rules.cutoff:
                self.kept[KEPT_NEW] += 1
            else:
                self.candidates.append(Doomed(child, st.st_size, newest, st.st_ino, checkpoint))
        else:
            self.kept[KEPT_SPECIAL] += 1
            return 0.0
        if checkpoint == child:
            self.checkpoints[run][child] = newest
        return newest

    def _kept_by_name(self, name: str, child: str) -> str | None:
        if self.rules.protection.matches(name, child):
            return KEPT_PROTECTED
        if rules.is_best(name):
            return KEPT_BEST
        return None

    def _directory(self, dir_fd: int, name: str, child: str, mtime: float, run: str, checkpoint: str | None) -> float:
        try:
            fd = fileops.open_directory(name, dir_fd)
        except OSError as exc:
            log.warning("keeping %s: cannot open it: %s", child, exc.strerror)
            self.kept[KEPT_UNREADABLE] += 1
            return 0.0
        try:
            if fileops.fd_is_locked(fd):
                self.kept[KEPT_LOCKED] += 1
                return mtime
            entries, newest = self.walk(fd, child, run, checkpoint)
        finally:
            os.close(fd)
        self.directories.append(_Directory(child, entries, mtime))
        return newest
