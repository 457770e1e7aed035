"""Which directories may be a cleanup root at all.

A root is refused when deleting "everything old below it" could destroy a system or a
person's home:

- the system's own trees, and anything below them: ``/etc``, ``/usr``, ``/boot``, ``/dev``
  (so ``/dev/shm``), ``/proc``, ``/sys``, ``/run``, ``/bin``, ``/sbin``, every top-level
  ``/lib*``, ``/var/lib``, ``/var/opt`` and ``/var/local`` (package, service and site state),
  ``/var/cache``; and the trees whose files other tools own and age out themselves, where
  "old" is not "unneeded": ``/var/log`` (logrotate and journald keep logs, audit trails among
  them, as long as policy says), ``/var/spool`` (crontabs, mail and print queues, at jobs),
  ``/var/mail`` (mailboxes) and ``/var/backups`` (dpkg's backups; mlwarden's own backups,
  whose retention is ``mlwarden backup``'s, not an age);
- directories that hold other people's things, themselves only (a subdirectory made for the
  experiments is fine): ``/``, ``/opt``, ``/srv``, ``/home``, ``/mnt``, ``/media``, ``/tmp``,
  ``/var``, ``/var/tmp``, every ``/home/NAME``, ``$HOME`` and every home directory in the
  password database (``/root`` among them);
- a relative or empty path, whose meaning depends on where cron happens to start the job.

The check runs on the path as given and on its real path (symlinks resolved), so
``/srv/../etc`` or a symlink pointing into ``/usr`` is refused too.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

SYSTEM_TREES = tuple(
    Path(p)
    for p in (
        "/etc", "/usr", "/boot", "/dev", "/proc", "/sys", "/run", "/bin", "/sbin", "/var/lib", "/var/opt", "/var/local",
        "/var/cache", "/var/log", "/var/spool", "/var/mail", "/var/backups",
    )
)
SHARED_DIRECTORIES = frozenset(
    Path(p)
    for p in ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/tmp", "/var", "/var/tmp")
)


def home_directories() -> frozenset[Path]:
    """``$HOME`` and every home directory in the password database."""
    homes = {Path(entry.pw_dir) for entry in pwd.getpwall() if entry.pw_dir not in ("", "/")}
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]))
    return frozenset(homes)


def refusal(path: Path) -> str | None:
    """Why the absolute, normalised ``path`` may not be a cleanup root, or None."""
    for tree in SYSTEM_TREES:
        if path.is_relative_to(tree):
            return "a system directory" if path == tree else f"it lies under {tree}, a system directory"
    if len(path.parts) > 1 and path.parts[1].startswith("lib"):  # /lib, /lib32, /lib64, /libx32
        top = Path("/", path.parts[1])
        return "a system directory" if path == top else f"it lies under {top}, a system directory"
    if path in SHARED_DIRECTORIES:
        return "a shared system directory (a subdirectory of it is fine)"
    if path.parent == Path("/home") or path in home_directories():
        return "a home directory (a subdirectory of it is fine)"
    return None


def checked_root(text: str) -> Path:
    """The real path of a cleanup root, or ValueError saying why it is refused."""
    if not text.strip():
        raise ValueError("an empty path is not a cleanup root")
    given = Path(text)
    if not given.is_absolute():
        raise ValueError("a cleanup root must be an absolute path")
    real = Path(os.path.realpath(given))
    for candidate in (Path(os.path.normpath(given)), real):
        reason = refusal(candidate)
        if reason is not None:
            shown = candidate if candidate == given else f"{candidate} (from {text})"
            raise ValueError(f"refusing to clean {shown}: {reason}")
    if not real.is_dir():
        raise ValueError(f"{real} is not an existing directory")
    return real
