"""Logging for every mlwarden command.

Logs go to stderr (journald collects them); ``--log-file`` adds a file that is reopened
when logrotate moves it (``WatchedFileHandler``), so the rotation needs no ``copytruncate``
and loses no line. Every registered secret is masked in every record, whatever logger or
library produced it.

Three formats (``--log-format``): ``text`` for people, ``logfmt`` and ``json`` for log
pipelines (Loki, Elasticsearch). Timestamps are UTC in RFC 3339 with milliseconds
(``2026-11-29T18:00:00.123Z``), so lines from machines in different zones sort together.
Under journald, which stamps every line itself, stderr lines carry no timestamp.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
MASK = "***"
FORMATS = ("text", "logfmt", "json")


def register_secret(value: str) -> None:
    """Mask ``value`` in every log record from now on. Short values are ignored (too many false hits)."""
    if len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    # Longest first: a secret that contains a shorter one must be masked whole, not left with
    # its tail showing after the shorter one's mask.
    for secret in sorted(_secrets, key=len, reverse=True):
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


def rfc3339(created: float) -> str:
    """``2026-11-29T18:00:00.123Z`` for a ``time.time()`` value."""
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


class _StructuredFormatter(logging.Formatter):
    """Shared by every format: the record as ordered fields (time, level, logger, message, error)."""

    def __init__(self, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        result = {"ts": rfc3339(record.created)} if self.timestamps else {}
        result.update(level=record.levelname.lower(), logger=record.name, msg=record.getMessage())
        # RedactingFilter leaves a masked traceback in exc_text and drops exc_info.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            result["exc"] = record.exc_text
        if record.stack_info:
            result["stack"] = record.stack_info
        return result


class TextFormatter(_StructuredFormatter):
    """``2026-11-29T18:00:00.123Z WARNING mlwarden.relay: message``, traceback on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        f = self.fields(record)
        line = f"{f['level'].upper()} {f['logger']}: {f['msg']}"
        if "ts" in f:
            line = f"{f['ts']} {line}"
        return "\n".join([line, *(f[key] for key in ("exc", "stack") if key in f)])


_LOGFMT_BARE = re.compile(r"[^\s\"=\\]+")


def _logfmt_value(value: str) -> str:
    if _LOGFMT_BARE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(_StructuredFormatter):
    """``ts=... level=warning logger=mlwarden.relay msg="..."``: one line per record, always."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in self.fields(record).items())


class JsonFormatter(_StructuredFormatter):
    """One JSON object per line with the keys ``ts``, ``level``, ``logger``, ``msg``, ``exc`` and ``stack``."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.fields(record), ensure_ascii=False)


_FORMATTERS: dict[str, type[_StructuredFormatter]] = {
    "text": TextFormatter, "logfmt": LogfmtFormatter, "json": JsonFormatter,
}


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal connection systemd names in ``JOURNAL_STREAM`` (``dev:inode``).

    Comparing the descriptor, not only the variable's presence, matters: a child process
    inherits the variable even when its stderr was redirected to a file or a pipe.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup(level: str = "info", log_file: Path | None = None, log_format: str = "text") -> None:
    """Configure the root logger: stderr always, plus an optional rotating-safe file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = _FORMATTERS[log_format]
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter(timestamps=not under_journald(sys.stderr)))
    handlers: list[logging.Handler] = [stderr]
    if log_file is not None:
        handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
        handlers[-1].setFormatter(formatter())
    for handler in handlers:
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that log request URLs (which may hold webhook secrets) stay at warning.
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


LEVELS = ("debug", "info", "warning", "error")


def uvicorn_options() -> dict[str, Any]:
    """How both servers (exporter, relay) hand logging to uvicorn; call after :func:`setup`.

    uvicorn keeps its own configuration out (our handlers, formats and redaction apply),
    its access log stays off (a scrape or a webhook every few seconds is not news), and its
    info lines ("Started server process", "Uvicorn running on") are dropped because each
    server logs its own start and stop: only its warnings and errors show, unless the
    command runs at ``--log-level debug``.
    """
    return {
        "log_config": None,
        "access_log": False,
        "log_level": logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.WARNING,
    }


class RepeatFilter(logging.Filter):
    """Lets the first of a run of like warnings or errors through, then one summary per interval.

    Records are alike when they share logger, level and message template (the arguments may
    differ: an error whose text changes on every try is still the same failure). After a
    record goes through, its repeats are counted for ``interval`` seconds; the first repeat
    after that goes through with the count appended, and a new interval begins. With
    ``about``, only the records that carry one of those exception types among their arguments
    are limited (``log.addFilter(RepeatFilter(about=(StoreError,)))`` quiets a loop that fails
    on every pass while the store is down, and leaves every other line of that logger alone).
    """

    def __init__(
        self,
        interval: float = 60.0,
        about: tuple[type[BaseException], ...] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.about = about
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (when the last record went through, repeats suppressed since)
        self._runs: dict[tuple[str, int, object], tuple[float | None, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not self._concerns(record):
            return True
        key = (record.name, record.levelno, record.msg)
        now = self._clock()
        with self._lock:
            passed, suppressed = self._runs.get(key, (None, 0))
            if passed is not None and now < passed + self.interval:
                self._runs[key] = (passed, suppressed + 1)
                return False
            self._runs[key] = (now, 0)
        if suppressed:
            assert passed is not None
            record.msg = f"{record.getMessage()} ({suppressed} more like this in the last {now - passed:.0f}s)"
            record.args = None
        return True

    def _concerns(self, record: logging.LogRecord) -> bool:
        if self.about is None:
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return any(isinstance(arg, self.about) for arg in args)
