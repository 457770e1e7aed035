"""Where mlwarden's operator files are, in a checkout and in an installed wheel.

The files are the repository's own folders: ``alerts/`` (rules, their promtool tests, the
Alertmanager and Prometheus examples), ``dashboards/`` (Grafana JSON), ``deploy/`` (systemd
units, cron, logrotate, Kubernetes manifests) and ``relay/relay.example.yml``. The build maps
the first three into this package (``pyproject.toml``: ``mlwarden.assets.alerts = "alerts"``
...) and ships the relay example with ``mlwarden.relay``, so an installed wheel carries them;
in a checkout they are read where they are. Everything that reads them asks this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

# The folders the build maps into this package, under the same names.
FOLDERS = ("alerts", "dashboards", "deploy")
RELAY_EXAMPLE = PurePosixPath("relay/relay.example.yml")
# What an operator gets is configuration, not the generators that write some of it.
_NOT_SHIPPED = frozenset({".py", ".pyc"})
_CHECKOUT = Path(__file__).resolve().parents[2]


class AssetError(LookupError):
    """An asset that should exist does not: the installation is incomplete."""


def folder(name: str) -> Traversable:
    """One of :data:`FOLDERS`, from the installed package or, failing that, the checkout."""
    if name not in FOLDERS:
        raise ValueError(f"unknown asset folder {name!r}; expected one of {', '.join(FOLDERS)}")
    installed = files(__name__).joinpath(name)
    if installed.is_dir():
        return installed
    # An editable install or a plain checkout: this package holds only this module.
    checkout = _CHECKOUT / name
    if checkout.is_dir():
        return checkout
    raise AssetError(f"mlwarden's {name}/ folder is missing from this installation (reinstall mlwarden)")


def relay_example() -> Traversable:
    return files("mlwarden.relay").joinpath(RELAY_EXAMPLE.name)


def walk() -> Iterator[tuple[PurePosixPath, Traversable]]:
    """Every shipped file as (path relative to an export directory, its resource)."""
    for name in FOLDERS:
        yield from _walk(folder(name), PurePosixPath(name))
    yield RELAY_EXAMPLE, relay_example()


def _walk(node: Traversable, relative: PurePosixPath) -> Iterator[tuple[PurePosixPath, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda entry: entry.name):
        path = relative / child.name
        if child.is_dir():
            if child.name != "__pycache__":
                yield from _walk(child, path)
        elif path.suffix not in _NOT_SHIPPED:
            yield path, child
