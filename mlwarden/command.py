"""The one small interface every ``mlwarden`` subcommand implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """A subcommand: its settings dataclass (see :mod:`mlwarden.settings`) and what it runs.

    ``run`` receives the validated settings and returns an exit status
    (:class:`mlwarden.exitcodes.ExitCode`).
    """

    name: str
    help: str
    settings: type
    run: Callable[[Any], int]
    description: str = ""
