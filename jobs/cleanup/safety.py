"""Which directories may be a cleanup root at all.

A root is refused when deleting "everything old below it" could destroy a system or a
person's home: the filesystem root, system directories, any user's home directory, or a
relative or empty path (whose meaning depends on where cron happens to start the job).
The check runs on the path as given and on its real path, so ``/srv/../etc`` or a symlink
pointing at ``/home`` is refused too.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

SYSTEM_DIRECTORIES = frozenset(
    Path(p)
    for p in (
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media",
        "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
        "/var", "/var/lib", "/var/log", "/var/tmp",
    )
)


def home_directories() -> frozenset[Path]:
    """``$HOME`` and every home directory in the password database."""
    homes = {Path(entry.pw_dir) for entry in pwd.getpwall() if entry.pw_dir not in ("", "/")}
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]))
    return frozenset(homes)


def checked_root(text: str) -> Path:
    """The real path of a cleanup root, or ValueError saying why it is refused."""
    if not text.strip():
        raise ValueError("an empty path is not a cleanup root")
    given = Path(text)
    if not given.is_absolute():
        raise ValueError("a cleanup root must be an absolute path")
    real = Path(os.path.realpath(given))
    refused = SYSTEM_DIRECTORIES | home_directories()
    for candidate in (Path(os.path.normpath(given)), real):
        if candidate in refused:
            raise ValueError(f"refusing to clean {candidate}: a system or home directory")
    if not real.is_dir():
        raise ValueError(f"{real} is not an existing directory")
    return real
