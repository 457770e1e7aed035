"""The one small interface every ``mlwarden`` subcommand implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

SettingsT = TypeVar("SettingsT")


@dataclass(frozen=True)
class Command(Generic[SettingsT]):
    """A subcommand: its settings dataclass (see :mod:`mlwarden.settings`) and what it runs.

    Its one-line help is not here but in its module's ``MLWARDEN_COMMANDS`` table (see
    :mod:`mlwarden.registry`), which ``mlwarden --help`` reads without importing the module.

    ``run`` receives the validated settings and returns an exit status
    (:class:`mlwarden.exitcodes.ExitCode`). Being generic in the settings type, a command
    whose ``run`` expects other settings than it declares is a type error, not a crash at
    the first run.
    """

    name: str
    settings: type[SettingsT]
    run: Callable[[SettingsT], int]
    description: str = ""
