"""The one small interface every collector implements and the registry that finds them (node_exporter's shape).

A collector reads one thing (GPUs, processes, XID events, the backup catalog, artifact
directories) and returns metric families (:mod:`mlwarden.exporter.exposition`). It does not
know about HTTP or scrapes: the collection loop calls it on its own schedule and publishes the
result; the loop also adds each collector's success, duration and freshness series.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.exposition import Family

from mlwarden.settings import setting

SettingsT = TypeVar("SettingsT")
T = TypeVar("T")

GPU_LABELS = ("gpu", "uuid")


@dataclass(frozen=True)
class Collected:
    # the pass's families, or what makes them when its snapshot is first rendered: for series nobody needs between
    # scrapes (those made from a pass's GPU readings, the exporter's own process_*). A maker runs under its collector's
    # render lock (see snapshot._Part), one at a time.
    families: Sequence[Family] | Callable[[], Sequence[Family]] = field(default_factory=list)
    success: bool = True

    def made(self) -> Sequence[Family]:
        """The families, made now if the pass left them to its rendering (for callers that render by themselves)."""
        families = self.families
        return families() if callable(families) else families


class Collector(abc.ABC):
    name: str
    interval: float  # seconds between passes
    timeout: float  # a pass running longer than this is stale
    # True for a collector whose pass only reads memory or /proc/self and so cannot hang: the loop runs such
    # collectors of one interval back to back in one thread, one wakeup a second for all of them.
    light: bool = False
    # Collectors naming the same group (at the same interval) run back to back in one thread: the second pass
    # finds the caches the first warmed, and the thread wakes once. Those that call NVML share "nvml": a hung
    # call holds NVML's own lock anyway, so the others could not have answered meanwhile.
    group: str | None = None

    @abc.abstractmethod
    def collect(self) -> Collected: ...

    def start(self) -> None:  # noqa: B027 - an optional hook: most collectors have nothing to start
        """Start any background listener (the XID collector has one)."""

    def stop(self) -> None:  # noqa: B027 - an optional hook, like start
        """Stop what start() started."""


# The registry ---------------------------------------------------------------------------------
# Each module of this package registers its collector where it is defined (node_exporter's
# registerCollector): its name, whether it is on by default, its help, the settings only it
# reads and its factory. The exporter's flags, its dispatcher and the docs' collector table are
# made from these entries, so adding a collector is one new module and its test.


@dataclass(frozen=True)
class NoSettings:
    """The own settings of a collector that reads only the exporter's shared ones."""


@dataclass(frozen=True)
class CollectorContext:
    """What every collector may share: the GPU backend and the exporter's schedules."""

    supervisor: BackendSupervisor
    interval: float  # the fast collectors' --interval
    timeout: float  # --collection-timeout, or the interval
    slow_interval: float  # --artifacts-interval, for collectors that walk directory trees


@dataclass(frozen=True)
class CollectorSpec(Generic[SettingsT]):
    """One registered collector.

    ``settings`` is a dataclass of :func:`mlwarden.settings.setting` fields that only this
    collector reads (they become flags and ``MLWARDEN_EXPORTER_*`` variables of the exporter);
    ``factory`` builds the collector from them, or returns None when it has nothing to read
    (the backups collector without ``--backup-dir``).
    """

    name: str
    help: str
    factory: Callable[[SettingsT, CollectorContext], Collector | None]
    settings: type[SettingsT]
    default: bool = True

    @property
    def switch(self) -> str:
        """The settings field (and so the ``--collector-NAME`` flag) that turns it on or off."""
        return "collector_" + self.name.replace("-", "_")

    def build(self, settings: object, context: CollectorContext) -> Collector | None:
        if not getattr(settings, self.switch):
            return None
        own = self.settings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(self.settings)})  # type: ignore[arg-type]  # settings is a dataclass
        return self.factory(own, context)


_REGISTERED: dict[str, CollectorSpec[Any]] = {}


def register(spec: CollectorSpec[Any]) -> None:
    """Called once at the bottom of each collector's module."""
    known = _REGISTERED.get(spec.name)
    if known is not None and known.factory.__module__ != spec.factory.__module__:
        raise ValueError(f"collector {spec.name!r} is registered by {known.factory.__module__} and {spec.factory.__module__}")
    _REGISTERED[spec.name] = spec


@functools.cache
def registered() -> tuple[CollectorSpec[Any], ...]:
    """Every collector of this package, by name; importing its modules registers them."""
    package = __name__.rsplit(".", 1)[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name != "base":
            importlib.import_module(f"{package}.{module.name}")
    return tuple(_REGISTERED[name] for name in sorted(_REGISTERED))


def with_collector_settings(base: type[T]) -> type[T]:
    """``base`` (the exporter's settings) plus each collector's switch and own settings."""
    taken = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]  # base is a dataclass
    added: list[tuple[str, Any, Any]] = []
    for spec in registered():
        # --collector.NAME and --no-collector.NAME as node_exporter spells them, next to today's names.
        switch = setting(spec.default, aliases=(f"--collector.{spec.name}",), help=f"enable the {spec.name} collector: {spec.help}")
        hints = typing.get_type_hints(spec.settings)
        own: list[tuple[str, Any, Any]] = [(spec.switch, bool, switch)]
        own += [(f.name, hints[f.name], _copy(f)) for f in dataclasses.fields(spec.settings)]
        for name, _, _ in own:
            if name in taken:
                raise ValueError(f"collector {spec.name!r} declares the setting {name!r}, which another part of the exporter has")
            taken.add(name)
        added += own
    composed = dataclasses.make_dataclass(base.__name__, added, bases=(base,), frozen=True)
    composed.__module__ = base.__module__  # so that get_type_hints resolves the base's annotations there
    return composed


def _copy(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=field.default_factory, metadata=field.metadata)
    return dataclasses.field(default=field.default, metadata=field.metadata)


def collectors_table() -> str:
    """The docs' table of collectors (``<!-- settings:exporter-collectors -->`` in docs/exporter.md)."""
    rows = ["| collector | default | switch | what it reads |", "| --- | --- | --- | --- |"]
    for spec in registered():
        flags = ", ".join(f"`{flag}` / `--no-{flag[2:]}`" for flag in ("--" + spec.switch.replace("_", "-"), f"--collector.{spec.name}"))
        rows.append(f"| `{spec.name}` | {'on' if spec.default else 'off'} | {flags} | {spec.help} |")
    return "\n".join(rows)
