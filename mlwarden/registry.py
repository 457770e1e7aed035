"""The subcommands of ``mlwarden``, declared where they are defined and found without importing them.

A module that defines commands declares them in one module-level literal table::

    MLWARDEN_COMMANDS = (
        {"name": "backup", "attribute": "BACKUP", "help": "archive, checksum, ...",
         "maintain": {"order": 20, "env": "RUN_BACKUP"}},
    )

``name`` is the subcommand, ``attribute`` the module's :class:`~mlwarden.command.Command`,
``help`` its one line in ``mlwarden --help``; ``maintain`` (optional) puts the command in
``mlwarden maintain``'s plan: ``order`` sorts the plan, ``setting`` names the on/off setting
(default ``run_<name>``) and ``env`` adds a legacy variable for it. ``heartbeat`` (optional)
says the command is a scheduled job that pushes a heartbeat under ``mlwarden_<heartbeat>``
(:mod:`mlwarden.heartbeat`), with the schedule its settings hold: the exporter then expects it
on every host where it is configured, so that a job that never reported is an alert too.

The table is read from the source (:func:`ast.literal_eval` of the text from the line that
starts with ``MLWARDEN_COMMANDS = (`` to the first line that is only ``)``), never by
importing the module: the dispatcher, ``mlwarden --help``, the ``maintain`` plan and the
generated docs all come from it, while ``mlwarden cleanup`` still imports neither FastAPI
nor boto3. Finding the tables costs one read of each source file of the package and a
literal parse of a few small tables, some milliseconds; the result is cached per process.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlwarden.command import Command

TABLE = "MLWARDEN_COMMANDS"
_TABLE_TEXT = re.compile(rf"^{TABLE} = (\(.*?^\))", re.M | re.S)
# The design's parts, searched in this order (which is also the order of ``mlwarden --help``).
# A new part of the design is a new root here; a new command or job is not.
ROOTS = ("mlwarden.exporter", "mlwarden.relay", "mlwarden.jobs", "mlwarden")


class RegistryError(RuntimeError):
    """A command table is malformed or two modules declare the same command."""


@dataclass(frozen=True)
class MaintainStep:
    order: int
    setting: str
    env: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    name: str
    module: str
    attribute: str
    help: str
    maintain: MaintainStep | None = None
    heartbeat: str | None = None

    def load(self) -> Command[Any]:
        command = getattr(importlib.import_module(self.module), self.attribute)
        if not isinstance(command, Command) or command.name != self.name:
            raise RegistryError(f"{self.module}.{self.attribute} is not the Command {self.name!r} its table declares")
        return command


def _source_files(package: str) -> list[tuple[str, Path]]:
    """(module name, path) of every source file under a package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[tuple[str, Path]] = []
    for location in spec.submodule_search_locations:
        for directory, subdirs, files in os.walk(location):
            relative = os.path.relpath(directory, location)
            prefix = package if relative == "." else package + "." + relative.replace(os.sep, ".")
            # An installed wheel nests the other roots inside mlwarden/: each is walked once, as its own root.
            subdirs[:] = [
                d for d in subdirs
                if os.path.exists(os.path.join(directory, d, "__init__.py")) and f"{prefix}.{d}" not in ROOTS
            ]
            for file in sorted(files):
                if file.endswith(".py"):
                    stem = file[:-3]
                    found.append((prefix if stem == "__init__" else f"{prefix}.{stem}", Path(directory, file)))
    return sorted(found)


def _table(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    # A substring test first: the multi-line regex over all 119 source files cost 10 ms of every
    # command's start, and all but a few files have no table.
    match = _TABLE_TEXT.search(text) if f"{TABLE} = (" in text else None
    if match is None:
        return None
    try:
        return ast.literal_eval(match.group(1))
    except (SyntaxError, ValueError) as exc:
        raise RegistryError(f"{path}: {TABLE} must be a tuple of literal dicts closed by a line ')': {exc}") from None


def _entry(module: str, row: Any) -> Entry:
    try:
        maintain = row.get("maintain")
        step = None
        if maintain is not None:
            env = maintain.get("env")
            step = MaintainStep(int(maintain["order"]), maintain.get("setting", "run_" + row["name"]), (env,) if env else ())
        heartbeat = row.get("heartbeat")
        if heartbeat is not None and not re.fullmatch(r"[a-z][a-z0-9_]*", heartbeat):
            raise ValueError(f"heartbeat {heartbeat!r} is not a job name such as backup or restore_drill")
        return Entry(row["name"], module, row["attribute"], row["help"], step, heartbeat)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{module}: malformed {TABLE} row {row!r}: {exc!r}") from None


@functools.cache
def entries() -> dict[str, Entry]:
    """Every declared command, by name, in the order of ``mlwarden --help``."""
    result: dict[str, Entry] = {}
    for root in ROOTS:
        for module, path in _source_files(root):
            for row in _table(path) or ():
                entry = _entry(module, row)
                if entry.name in result:
                    raise RegistryError(f"command {entry.name!r} is declared by {result[entry.name].module} and {module}")
                result[entry.name] = entry
    return result


def maintain_plan() -> list[Entry]:
    """The commands ``mlwarden maintain`` runs, in order."""
    steps = [entry for entry in entries().values() if entry.maintain is not None]
    return sorted(steps, key=lambda entry: (entry.maintain.order if entry.maintain else 0, entry.name))


def heartbeats() -> dict[str, Entry]:
    """The commands that push a heartbeat, by the name they push it under."""
    result: dict[str, Entry] = {}
    for entry in entries().values():
        if entry.heartbeat is None:
            continue
        if entry.heartbeat in result:
            raise RegistryError(f"heartbeat {entry.heartbeat!r} is declared by {result[entry.heartbeat].name} and {entry.name}")
        result[entry.heartbeat] = entry
    return result
