"""``mlwarden assets``: hand an operator who installed with pip the files a checkout has."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from mlwarden import assets
from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.fsutil import atomic_write_bytes
from mlwarden.settings import setting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AssetsSettings:
    action: str = setting(
        positional=True, choices=("export", "list"), metavar="ACTION",
        help="`export DIR` writes the files under DIR; `list` prints their paths",
    )
    directory: Path | None = setting(None, positional=True, metavar="DIR", help="where `export` writes")
    force: bool = setting(False, help="let `export` overwrite files that already exist in DIR")

    def __post_init__(self) -> None:
        if self.action == "export" and self.directory is None:
            raise ValueError("mlwarden assets export needs a directory: mlwarden assets export DIR")


def export(directory: Path, *, force: bool = False) -> list[Path]:
    """Write every asset under ``directory``; without ``force``, refuse before writing anything
    if one of them is there already (an operator's edited copy is not silently replaced)."""
    planned = [(directory / relative, resource) for relative, resource in assets.walk()]
    if not force:
        taken = [target for target, _ in planned if target.exists() or target.is_symlink()]
        if taken:
            shown = ", ".join(str(path) for path in taken[:3]) + (" ..." if len(taken) > 3 else "")
            raise FileExistsError(f"{len(taken)} file(s) already exist ({shown}); use --force to overwrite")
    for target, resource in planned:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, resource.read_bytes())
    return [target for target, _ in planned]


def run(settings: AssetsSettings) -> int:
    if settings.action == "list":
        for relative, _ in assets.walk():
            print(relative)
        return ExitCode.OK
    assert settings.directory is not None  # __post_init__
    try:
        written = export(settings.directory, force=settings.force)
    except FileExistsError as exc:
        print(f"mlwarden assets: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"mlwarden assets: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return ExitCode.FAILURE
    log.info("wrote %d files under %s", len(written), settings.directory)
    return ExitCode.OK


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "assets", "attribute": "COMMAND", "help": "export the rules, dashboards, systemd units and Kubernetes manifests"},
)

COMMAND = Command(
    "assets",
    settings=AssetsSettings,
    run=run,
    description="The files a checkout has, for an installation from a wheel: Prometheus rules and their "
    "tests, Alertmanager and Prometheus examples, Grafana dashboards, systemd units and timers, cron and "
    "logrotate files, Kubernetes manifests and the relay's example configuration.",
)
