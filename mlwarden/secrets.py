"""Reading a secret the one way every part accepts: an environment variable, or ``<VAR>_FILE``.

A file (a Kubernetes or Docker secret, a systemd credential) keeps the value out of the
process environment, which other processes of the same user and crash reports can read.
The value read is registered with :mod:`mlwarden.logs`, so that no log line can carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlwarden import logs


class SecretError(ValueError):
    """The secret's file cannot be read. The message names the variable, never the value."""


def read_secret(variable: str, environ: Mapping[str, str]) -> str | None:
    """The value of ``variable``, else the content of the file ``<variable>_FILE`` names; None if neither is set.

    Surrounding whitespace is dropped (a file ends with a newline; a value pasted into an
    environment file often has a stray space). An empty variable counts as unset when a
    ``_FILE`` is given: an environment file often keeps the line and blanks the value.
    """
    value = environ.get(variable, "").strip()
    if not value and f"{variable}_FILE" in environ:
        path = environ[f"{variable}_FILE"]
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(f"cannot read {variable}_FILE={path!r}: {exc.strerror}") from None
    elif variable not in environ:
        return None
    if value:
        logs.register_secret(value)
    return value
