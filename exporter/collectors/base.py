"""The one small interface every collector implements (the shape of node_exporter's collectors).

A collector reads one thing (GPUs, processes, XID events, the backup catalog, artifact
directories) and returns metric families (:mod:`mlwarden.exporter.exposition`). It does not
know about HTTP or scrapes: the collection loop calls it on its own schedule and publishes the
result; the loop also adds each collector's success, duration and freshness series.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from mlwarden.exporter.exposition import Family

GPU_LABELS = ("gpu", "uuid")


@dataclass(frozen=True)
class Collected:
    families: list[Family] = field(default_factory=list)
    success: bool = True


class Collector(abc.ABC):
    name: str
    interval: float  # seconds between passes
    timeout: float  # a pass running longer than this is stale

    @abc.abstractmethod
    def collect(self) -> Collected: ...

    def start(self) -> None:
        """Start any background listener (the XID collector has one)."""

    def stop(self) -> None:
        """Stop what start() started."""
