"""The build maps the design's folders into the one ``mlwarden`` namespace; nothing is left out."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_the_mlwarden_namespace() -> None:
    config = _setuptools()
    on_disk = set()
    for package, folder in config["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            on_disk.add(".".join((package, *relative.parts)))
    # The operator's folders (alerts/, dashboards/, deploy/) are data-only packages: no __init__.py.
    data_only = {name for name in config["packages"] if name.startswith("mlwarden.assets.")}
    assert set(config["packages"]) - data_only == on_disk
    for name in data_only:
        assert _folder_of(name, config["package-dir"]).is_dir(), name
    assert {name.split(".")[0] for name in config["packages"]} == {"mlwarden"}


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = package_dir.get(".".join(parts[:cut]))
        if mapped is not None:
            return REPO / mapped / Path(*parts[cut:])
    raise AssertionError(f"{package} is not under a package-dir entry")


def test_the_repository_folders_import_only_through_the_namespace() -> None:
    import mlwarden.exporter.cli
    import mlwarden.jobs.backup.job
    import mlwarden.relay.app

    assert Path(mlwarden.exporter.cli.__file__).parent == REPO / "exporter"
    assert Path(mlwarden.relay.app.__file__).parent == REPO / "relay"
    assert mlwarden.jobs.backup.job.log.name == "mlwarden.jobs.backup.job"
