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
  checkpoint with everything in it; its age is that of its newest file). The newest N of each run (a run is a
  directory directly below the root) are kept; N is ``--keep-last-checkpoints``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

KEEP_MARKER = ".mlwarden-keep"

# A container such as ``checkpoints/`` is not itself a checkpoint: the patterns need a
# separator after the word, so the container's members are counted one by one.
CHECKPOINT_PATTERNS = (
    "checkpoint-*", "checkpoint_*", "checkpoint.*", "ckpt-*", "ckpt_*", "*.ckpt", "*.pt", "*.pth",
    "*.safetensors", "step_*", "step-*", "global_step*",
)

_CHECKPOINT = re.compile("|".join(fnmatch.translate(p) for p in CHECKPOINT_PATTERNS))
_BEST = re.compile(r"best", re.IGNORECASE)


def is_checkpoint(name: str) -> bool:
    return _CHECKPOINT.match(name) is not None


def is_best(name: str) -> bool:
    return _BEST.search(name) is not None


class Protection:
    """Matches names and relative paths against the ``--protect`` globs, compiled once."""

    def __init__(self, globs: Sequence[str]) -> None:
        by_name = [fnmatch.translate(g) for g in globs if "/" not in g]
        by_path = [fnmatch.translate(g.strip("/")) for g in globs if "/" in g]
        self.name_patterns = tuple(by_name)
        self._name = re.compile("|".join(by_name)) if by_name else None
        self._path = re.compile("|".join(by_path)) if by_path else None

    @property
    def has_path_globs(self) -> bool:
        return self._path is not None

    def matches(self, name: str, relative_path: str) -> bool:
        if self._name is not None and self._name.match(name):
            return True
        return self._path is not None and self._path.match(relative_path) is not None


def notable_names(protection: Protection) -> re.Pattern[str]:
    """One pattern that any name needing a closer look matches (best, checkpoint, protected).

    Most names in a tree match none of the rules; a single regex test lets them through fast.
    """
    parts = [_BEST.pattern.join(("(?i:.*", ")")), _CHECKPOINT.pattern, *protection.name_patterns]
    return re.compile("|".join(f"(?:{part})" for part in parts))
