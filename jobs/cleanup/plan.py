"""Build the complete cleanup plan before anything is deleted.

The walk goes through directory file descriptors (``openat`` with ``O_NOFOLLOW``), never
follows a symlink, never crosses a mount point (another filesystem, whose ``st_dev`` differs
from the root's, or a bind mount, whose mount ID differs: checked once per directory), and
does not descend into anything kept as a whole (protected, best, keep-marker or
locked directories). A file is planned for deletion when it is a regular file older than
the retention (by mtime), matches no keep rule, and is not among the newest checkpoints of
its run. Locked directories are kept whole here; locked files are found at the moment of
deletion (:mod:`.delete`), where a lock taken after planning also counts. Directories that
the plan empties (or that were already empty and are older than the retention) are removed
afterwards; the root itself never is.

The root's entries can be shared out among forked walk workers (:mod:`.forked`); each walks
its runs with its own :class:`_Walker`, and their findings are merged before the rules that
need the whole tree (the newest checkpoints, the emptied directories) are applied.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

from mlwarden.jobs.cleanup import fileops, forked, rules

from mlwarden.gcpause import cyclic_gc_paused

log = logging.getLogger(__name__)

KEPT_NEW = "newer than retention"
KEPT_PROTECTED = "protected glob"
KEPT_MARKER = "keep marker"
KEPT_BEST = "marked best"
KEPT_CHECKPOINT = "newest checkpoints of the run"
KEPT_LOCKED = "locked (flock)"
KEPT_SYMLINK = "symlink (never followed or removed)"
KEPT_MOUNT = "mount point (not entered)"
KEPT_SPECIAL = "not a regular file"
KEPT_UNREADABLE = "unreadable"

_FILE_TYPE = 0o170000  # stat.S_IFMT as a mask, without the function call


class Doomed(NamedTuple):
    """One regular file the plan deletes (a tuple: one is made per old file, so it must be cheap)."""

    directory: str  # '/'-separated, relative to the root ('' for the root itself)
    name: str
    size: int
    mtime: float
    inode: int
    checkpoint: str | None  # the checkpoint (file or directory) the file belongs to, if any

    @property
    def relative(self) -> str:
        return f"{self.directory}/{self.name}" if self.directory else self.name


# A named tuple's generated __new__ is a Python function; calling tuple.__new__ directly
# builds the same object at half the cost, which counts once per old file.
_new_named_tuple = tuple.__new__


@dataclass
class RootPlan:
    root: Path
    device: int
    inode: int
    mount: int  # the root's mount ID: no directory on another mount is entered or emptied
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


class _Directory(NamedTuple):
    relative: str
    entries: int
    mtime: float


def build(root: Path, plan_rules: PlanRules, workers: int = 1) -> RootPlan:
    """Walk ``root`` (already checked by :mod:`.safety`) and return what would be deleted.

    With ``workers`` above 1, the root's entries (the runs) are dealt out to that many
    processes: this one and forked children (:mod:`.forked`), each walking its share.
    """
    root_fd = fileops.open_directory(str(root))
    try:
        st = os.fstat(root_fd)
        fence = _Fence(st.st_dev, fileops.mount_id(root_fd))
        with cyclic_gc_paused():
            found = _walk_root(root_fd, fence, plan_rules, workers)
    finally:
        os.close(root_fd)
    plan = RootPlan(root=root, device=st.st_dev, inode=st.st_ino, mount=fence.mount, cutoff=plan_rules.cutoff, kept=found.kept)
    kept_checkpoints = _newest_checkpoints(found.checkpoints, plan_rules.keep_last_checkpoints)
    if kept_checkpoints:
        plan.files = _without_kept_checkpoints(found, kept_checkpoints)
    else:  # nothing to take back out of the plan
        plan.files = found.candidates
    plan.directories = _emptied_directories(found.planned_in, found.directories, plan_rules.cutoff)
    return plan


@dataclass
class _Findings:
    """What a walk found. The walks of separate parts of the tree merge into one."""

    candidates: list[Doomed] = field(default_factory=list)
    kept: Counter[str] = field(default_factory=Counter)
    planned_in: Counter[str] = field(default_factory=Counter)  # directory -> candidates directly in it
    directories: list[_Directory] = field(default_factory=list)  # post-order: children before parents
    # run -> checkpoint -> newest mtime of the checkpoint's files
    checkpoints: defaultdict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def merge(self, other: _Findings) -> None:
        self.candidates += other.candidates
        self.kept.update(other.kept)
        self.planned_in.update(other.planned_in)
        self.directories += other.directories  # disjoint subtrees: still children before parents
        for run, found in other.checkpoints.items():
            self.checkpoints[run].update(found)

    # A worker sends its findings pickled. Named tuples pickle through a Python method per
    # entry, plain ones do not: several times faster for the many plan entries.
    def __getstate__(self) -> tuple[object, ...]:
        plain = [*map(tuple, self.candidates)], [*map(tuple, self.directories)]
        return (*plain, self.kept, self.planned_in, dict(self.checkpoints))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        candidates, directories, self.kept, self.planned_in, checkpoints = state
        self.candidates = [*map(_new_named_tuple, repeat(Doomed), candidates)]
        self.directories = [*map(_new_named_tuple, repeat(_Directory), directories)]
        self.checkpoints = defaultdict(dict, checkpoints)


class _Fence(NamedTuple):
    """What every entry the walk descends into must share with the root."""

    device: int
    mount: int


def _walk_root(root_fd: int, fence: _Fence, plan_rules: PlanRules, workers: int) -> _Findings:
    names = os.listdir(root_fd)
    if plan_rules.keep_marker in names:
        return _Findings(kept=Counter({KEPT_MARKER: len(names)}))
    shares = [names[k::workers] for k in range(max(1, min(workers, len(names))))]
    found, *others = forked.fork_map(partial(_walk_share, root_fd, fence, plan_rules), shares)
    for other in others:
        found.merge(other)
    return found


def _walk_share(root_fd: int, fence: _Fence, plan_rules: PlanRules, names: list[str]) -> _Findings:
    """Plan the given entries of the root (a worker's share) and everything below them."""
    walker = _Walker(fence, plan_rules)
    walker.entries(root_fd, "", "", None, names)
    return walker.found


def _newest_checkpoints(checkpoints: dict[str, dict[str, float]], keep: int) -> set[str]:
    newest: set[str] = set()
    for found in checkpoints.values():
        ordered = sorted(found.items(), key=lambda item: (item[1], item[0]), reverse=True)
        newest.update(name for name, _ in ordered[:keep])
    return newest


def _without_kept_checkpoints(found: _Findings, kept_checkpoints: set[str]) -> list[Doomed]:
    """The candidates minus the files of the checkpoints kept; the counts follow."""
    files = []
    for candidate in found.candidates:
        if candidate.checkpoint is not None and candidate.checkpoint in kept_checkpoints:
            found.kept[KEPT_CHECKPOINT] += 1
            found.planned_in[candidate.directory] -= 1
        else:
            files.append(candidate)
    return files


def _parent(relative: str) -> str:
    return relative.rpartition("/")[0]


def _emptied_directories(planned_in: Counter[str], directories: list[_Directory], cutoff: float) -> list[str]:
    """Directories (children before parents) left empty once the planned files are gone.

    ``planned_in`` counts the planned files of each directory; it is updated in place
    with the directories removed.
    """
    result = []
    for directory in directories:  # post-order: every child before its parent
        emptied = planned_in[directory.relative] == directory.entries
        # An empty directory nobody touched lately; a fresh one may be a run that just started.
        if emptied and (directory.entries > 0 or directory.mtime < cutoff):
            result.append(directory.relative)
            planned_in[_parent(directory.relative)] += 1
    return result


class _Walker:
    def __init__(self, fence: _Fence, plan_rules: PlanRules) -> None:
        self.device = fence.device
        self.mount = fence.mount
        self.rules = plan_rules
        self.screen = rules.NameScreen(plan_rules.protection)
        self.found = _Findings()

    def walk(self, dir_fd: int, relative: str, run: str, checkpoint: str | None) -> tuple[int, float]:
        """Plan one directory; returns its number of entries and the newest file mtime below it."""
        names = os.listdir(dir_fd)
        if self.rules.keep_marker in names:
            self.found.kept[KEPT_MARKER] += len(names)
            return len(names), 0.0
        return len(names), self.entries(dir_fd, relative, run, checkpoint, names)

    def entries(self, dir_fd: int, relative: str, run: str, checkpoint: str | None, names: list[str]) -> float:
        """Plan these entries of one directory; returns the newest file mtime below them.

        This loop runs once per file in the tree, so the common case (an old or young
        regular file with an ordinary name) is tested first and takes as few steps as
        possible; everything else falls through to the slower, careful branches. Names
        come from ``listdir`` and are ``lstat``-ed one at a time relative to the directory
        fd: no ``DirEntry`` objects, and each stat result is freed as soon as it is used.
        """
        newest = 0.0
        prefix = relative + "/" if relative else ""
        notable = self.screen.notable(names)
        cutoff = self.rules.cutoff
        device = self.device
        kept = self.found.kept
        keep_young = planned = 0
        plan_file = self.found.candidates.append
        lstat, regular = os.lstat, stat.S_IFREG
        for name in names:
            try:
                st = lstat(name, dir_fd=dir_fd)  # lstat: a symlink is seen as one, never followed
            except FileNotFoundError:  # removed since the listing (it still counts as an entry: kept)
                continue
            kind = st.st_mode & _FILE_TYPE
            # An ordinary file on the root's filesystem; symlinks, other filesystems and
            # names a rule may keep fail this test and get their own branch below.
            if kind == regular and st.st_dev == device and name not in notable:
                mtime = st.st_mtime
                if mtime < cutoff:
                    plan_file(_new_named_tuple(Doomed, (relative, name, st.st_size, mtime, st.st_ino, checkpoint)))
                    planned += 1
                else:
                    keep_young += 1
            elif kind == stat.S_IFLNK:
                kept[KEPT_SYMLINK] += 1
                continue
            elif st.st_dev != device:
                kept[KEPT_MOUNT] += 1
                continue
            elif name in notable:
                mtime = self._notable(dir_fd, name, prefix + name, st, run if relative else None, checkpoint)
            elif kind == stat.S_IFDIR:
                child = prefix + name
                mtime = self._directory(dir_fd, name, child, st.st_mtime, run if relative else child, checkpoint)
            else:
                kept[KEPT_SPECIAL] += 1
                continue
            if mtime > newest:
                newest = mtime
        if keep_young:
            kept[KEPT_NEW] += keep_young
        if planned:
            self.found.planned_in[relative] += planned
        return newest

    def _notable(self, dir_fd: int, name: str, child: str, st: os.stat_result, run: str | None, checkpoint: str | None) -> float:
        """An entry whose name or path matches a keep rule or the checkpoint patterns."""
        keep_reason = self._kept_by_name(name, child)
        if keep_reason is not None:
            self.found.kept[keep_reason] += 1
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
                self.found.kept[KEPT_NEW] += 1
            else:
                directory = _parent(child)
                self.found.candidates.append(Doomed(directory, name, st.st_size, newest, st.st_ino, checkpoint))
                self.found.planned_in[directory] += 1
        else:
            self.found.kept[KEPT_SPECIAL] += 1
            return 0.0
        if checkpoint == child:
            self.found.checkpoints[run][child] = newest
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
            self.found.kept[KEPT_UNREADABLE] += 1
            return 0.0
        try:
            # A bind mount of a directory on the root's own filesystem passed the st_dev
            # test; its mount ID gives it away. Checked on the open fd, so no mount made
            # between the check and the walk can slip in.
            if fileops.mount_id(fd) != self.mount:
                self.found.kept[KEPT_MOUNT] += 1
                return mtime
            if fileops.fd_is_locked(fd):
                self.found.kept[KEPT_LOCKED] += 1
                return mtime
            entries, newest = self.walk(fd, child, run, checkpoint)
        finally:
            os.close(fd)
        self.found.directories.append(_Directory(child, entries, mtime))
        return newest
