"""What the cleanup keeps regardless of age: protected globs, markers and checkpoints.

- **Protected globs** (``--protect``): a glob without ``/`` matches an entry's name at any
  depth (``*.yaml``, ``final*``); a glob with ``/`` matches the path relative to the root
  (``run-*/eval/*``; ``*`` may cross ``/``). A matching directory protects its whole tree.
- **Keep marker**: a directory holding a file named ``.mlwarden-keep`` (configurable) is kept
  with everything below it.
- **Best**: an entry whose name contains ``best`` (any case: ``best.pt``, ``model_best.pth``,
  ``best_model/``) is kept, a directory with its whole tree.
- **Checkpoints**: entries whose name matches :data:`CHECKPOINT_PATTERNS` (a file such as
  ``step_1000.pt``, or a directory such as Hugging Face's ``checkpoint-500/``, counted as one
  checkpoint with everything in it; its age is that of its newest file). The newest N of
  each run (a run is a directory directly below the root) are kept; N is
  ``--keep-last-checkpoints``.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Sequence, Set
from itertools import compress, repeat

KEEP_MARKER = ".mlwarden-keep"

# A container such as ``checkpoints/`` is not itself a checkpoint: the patterns need a
# separator after the word, so the container's members are counted one by one.
CHECKPOINT_PATTERNS = (
    "checkpoint-*", "checkpoint_*", "checkpoint.*", "ckpt-*", "ckpt_*", "*.ckpt", "*.pt", "*.pth",
    "*.safetensors", "step_*", "step-*", "global_step*",
)

_CHECKPOINT = re.compile("|".join(fnmatch.translate(p) for p in CHECKPOINT_PATTERNS))
_GLOB_SPECIALS = frozenset("*?[")


def is_checkpoint(name: str) -> bool:
    return _CHECKPOINT.match(name) is not None


def is_best(name: str) -> bool:
    # casefold() also folds the odd letters that case-insensitive regexes match (long s).
    return "best" in name.casefold()


class Protection:
    """Matches names and relative paths against the ``--protect`` globs, compiled once."""

    def __init__(self, globs: Sequence[str]) -> None:
        self.name_globs = tuple(g for g in globs if "/" not in g)
        by_name = [fnmatch.translate(g) for g in self.name_globs]
        by_path = [fnmatch.translate(g.strip("/")) for g in globs if "/" in g]
        self._name = re.compile("|".join(by_name)) if by_name else None
        self._path = re.compile("|".join(by_path)) if by_path else None

    @property
    def has_path_globs(self) -> bool:
        return self._path is not None

    def matches(self, name: str, relative_path: str) -> bool:
        if self._name is not None and self._name.match(name):
            return True
        return self._path is not None and self._path.match(relative_path) is not None


class NameScreen:
    """Picks, from one directory's names, those that need a closer look.

    The closer look (in the planner) decides whether a name is best, a checkpoint or
    protected; the screen only sets aside the many names that can be none of them. It
    may pick a name that no rule keeps, never miss one that a rule keeps.

    It runs on a whole directory at once because a Python step per file costs more than
    the tests: the names are joined with NUL (which no file name contains) and searched
    once for ``best`` and once per kind of glob: a glob that is a literal prefix
    (``step_*``) matches right after a NUL, a literal suffix (``*.pt``) right before one.
    Only a directory where something is found gets the per-name tests, run in C by
    ``map``; globs of any other shape always need those.
    """

    def __init__(self, protection: Protection) -> None:
        self._everything = protection.has_path_globs  # a path glob can match any name
        prefixes, suffixes, others = _split_globs((*CHECKPOINT_PATTERNS, *protection.name_globs))
        self._prefixes, self._suffixes = prefixes, suffixes
        self._after_separator = _literal_alternatives(prefixes, "\0{}")
        self._before_separator = _literal_alternatives(suffixes, "{}\0")
        self._others = re.compile("|".join(fnmatch.translate(g) for g in others)).match if others else None

    def notable(self, names: list[str]) -> Set[str]:
        if self._everything:
            return set(names)
        if self._others is None and not self._may_match("\0" + "\0".join(names) + "\0"):
            return _NONE
        found = set(compress(names, map(str.endswith, names, repeat(self._suffixes))))
        found.update(compress(names, map(str.startswith, names, repeat(self._prefixes))))
        found.update(compress(names, map(operator.contains, map(str.casefold, names), repeat("best"))))  # is_best
        if self._others is not None:
            found.update(compress(names, map(self._others, names)))
        return found

    def _may_match(self, joined: str) -> bool:
        return (
            "best" in joined.casefold()  # casefold works character by character: no name's match is lost
            or (self._after_separator is not None and self._after_separator.search(joined) is not None)
            or (self._before_separator is not None and self._before_separator.search(joined) is not None)
        )


_NONE: Set[str] = frozenset()


def _literal_alternatives(literals: Sequence[str], shape: str) -> re.Pattern[str] | None:
    """One regex finding any of ``literals`` placed in ``shape`` (a format with one ``{}``)."""
    if not literals:
        return None
    return re.compile(shape.format("(?:" + "|".join(re.escape(literal) for literal in literals) + ")"))


def _split_globs(globs: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Split globs into literal prefixes (``abc*``), literal suffixes (``*abc``) and the rest."""
    prefixes, suffixes, others = [], [], []
    for glob in globs:
        if glob.endswith("*") and not _GLOB_SPECIALS.intersection(glob[:-1]):
            prefixes.append(glob[:-1])
        elif glob.startswith("*") and not _GLOB_SPECIALS.intersection(glob[1:]):
            suffixes.append(glob[1:])
        else:
            others.append(glob)
    return tuple(prefixes), tuple(suffixes), tuple(others)
