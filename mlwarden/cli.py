"""The ``mlwarden`` command: one entry point, one subcommand per part.

The subcommands come from :mod:`mlwarden.registry`, which reads each command's table where
the command is defined without importing it. Only the chosen subcommand's module is
imported, so ``mlwarden cleanup`` does not pay for FastAPI or boto3 and a broken optional
dependency of one part cannot stop another.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import logging
import os
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlwarden import __version__, gcpause, logs, registry, settings
from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.interrupts import Terminated


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    log_level: str = settings.setting("info", help="log level", choices=logs.LEVELS)
    log_file: Path | None = settings.setting(
        None, help="also log to this file; reopened when logrotate moves it"
    )
    log_format: str = settings.setting(
        "text", help="log line format: text for people, logfmt or json for log pipelines; timestamps are UTC",
        choices=logs.FORMATS,
    )


COMMON_PREFIX = ""  # MLWARDEN_LOG_LEVEL, MLWARDEN_LOG_FILE, MLWARDEN_LOG_FORMAT


def load_command(name: str) -> Command[Any]:
    return registry.entries()[name].load()


def build_parser(chosen: Command[Any] | None) -> settings.Parser:
    parser = settings.Parser(
        prog="mlwarden",
        description="Keeps GPU machines healthy and their models safe.",
        epilog="Every option is also an environment variable; see mlwarden COMMAND --help.",
    )
    parser.add_argument("--version", action="version", version=f"mlwarden {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, entry in registry.entries().items():
        if chosen is not None and chosen.name != name:
            # Only ``mlwarden --help`` lists the commands: a parser per command (argparse looks
            # up its messages' translations for each) cost 10 ms of every command's start.
            continue
        help_text = entry.help
        if chosen is not None:
            sub = subparsers.add_parser(
                name,
                help=help_text,
                description=textwrap.fill(chosen.description or help_text, 88),
                epilog=settings.secrets_help(chosen.settings, name) or None,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            settings.add_arguments(sub, chosen.settings, name, title=f"{name} options")
            settings.add_arguments(sub, CommonSettings, COMMON_PREFIX, title="options of every command")
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _chosen_name(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``; a usage error for an unknown one, with a suggestion."""
    commands = list(registry.entries())
    for token in argv:
        if not token.startswith("-"):
            if token not in commands:
                raise settings.SettingsError(
                    f"unknown command {token!r}{settings.suggestion(token, commands)}; "
                    f"commands: {', '.join(commands)}"
                )
            return token
    return None


def _parse(argv: list[str]) -> tuple[Command[Any], argparse.Namespace]:
    """The chosen command and its parsed flags; SettingsError for any usage error."""
    name = _chosen_name(argv)
    command = load_command(name) if name else None
    args, unknown = build_parser(command).parse_known_args(argv)
    if command is None:
        raise settings.SettingsError(f"a command is required: {', '.join(registry.entries())} (see mlwarden --help)")
    if unknown:
        flags = settings.flags_of(command.settings, command.name) + settings.flags_of(CommonSettings, COMMON_PREFIX)
        raise settings.unrecognized(unknown, flags)
    return command, args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, args = _parse(argv)
    except settings.SettingsError as exc:
        name = next((t for t in argv if t in registry.entries()), None)
        print(f"mlwarden {name}: {exc}" if name else f"mlwarden: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        common = settings.resolve(CommonSettings, COMMON_PREFIX, args)
        chosen = settings.resolve(command.settings, command.name, args)
    except settings.SettingsError as exc:
        print(f"mlwarden {command.name}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        logs.setup(common.log_level, common.log_file, common.log_format)
    except OSError as exc:
        print(f"mlwarden {command.name}: cannot open log file: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    log = logging.getLogger(f"mlwarden.{command.name}")
    try:
        return int(command.run(chosen))
    except Terminated:
        log.warning("stopped by SIGTERM")
        return ExitCode.TERMINATED
    except KeyboardInterrupt:
        log.warning("interrupted")
        return ExitCode.INTERRUPTED
    except Exception:
        log.exception("%s failed unexpectedly", command.name)
        return ExitCode.FAILURE


def entry() -> int:
    """The ``mlwarden`` process: :func:`main`, in a process that ends with the command, so
    that what it keeps to its end may be frozen out of the collector's reach
    (:func:`mlwarden.gcpause.kept_until_exit`), and that ends without tearing the interpreter
    down (:func:`_end_process`). Tests call :func:`main` in their own process."""
    gcpause.command_owns_process()
    code = main()
    _end_process(code)
    return code  # the interpreter's own exit, when _end_process could not end the process


def _end_process(code: int) -> None:
    """End the process with ``code`` now, if nothing is left to do but free memory.

    The interpreter's teardown frees every object the command kept (a backup's 20,000 file
    records, the modules), one by one: 45-60 ms of a 20,000-file backup here, for memory the
    kernel takes back at once. What the teardown does that counts is done here first: a
    collection of the garbage cycles (their finalizers run, as at a normal exit: 10-15 ms),
    the atexit handlers (logging's flushes and closes the log file) and the flush of stdout
    and stderr. It is skipped (returns, and the interpreter exits as usual) while a non-daemon
    thread is alive, which the interpreter would wait for, or when stdout or stderr cannot be
    flushed (a closed pipe: the interpreter reports that as it always has). A command closes
    the files it writes before it returns (atomic writers, ``with`` blocks): an open buffered
    file would not be flushed here."""
    current = threading.current_thread()
    if any(t is not current and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    gc.collect()
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe or stream
        return
    os._exit(code)


if __name__ == "__main__":
    sys.exit(entry())
