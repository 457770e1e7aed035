"""Logging for every mlwarden command.

Logs go to stderr (journald collects them); ``--log-file`` adds a file that is reopened
when logrotate moves it (``WatchedFileHandler``), so the rotation needs no ``copytruncate``
and loses no line. Every registered secret is masked in every record, whatever logger or
library produced it.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
from pathlib import Path

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
MASK = "***"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register_secret(value: str) -> None:
    """Mask ``value`` in every log record from now on. Short values are ignored (too many false hits)."""
    if len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record's message once and masks secrets in it (and in any traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def setup(level: str = "info", log_file: Path | None = None) -> None:
    """Configure the root logger: stderr always, plus an optional rotating-safe file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that log request URLs (which may hold webhook secrets) stay at warning.
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


LEVELS = ("debug", "info", "warning", "error")
