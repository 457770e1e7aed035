"""Exit statuses shared by every mlwarden command (cron and systemd read them)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # bad usage or configuration, stopped before anything was touched
    BREAKER = 3  # a safety breaker stopped the job; nothing was changed
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM (systemctl stop, a unit's timeout), for the jobs that handle it
