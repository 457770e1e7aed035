"""The repository's files as a fresh clone has them: what builds (the wheel, the image) start from.

Building in the working tree would pick up what a clone lacks: setuptools' stale ``build/``
directory, ignored or untracked files matching the package-data globs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def copy_to(destination: Path) -> Path:
    """Copy every tracked file, and every untracked one git does not ignore (work in progress)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination
