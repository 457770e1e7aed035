"""Fixtures that start the real components on loopback and stop them afterwards.

They do not skip when a binary is missing: a missing Prometheus is a broken set-up, and
the error says which Debian package to install.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlwarden import components

REPO = Path(__file__).resolve().parent.parent


Launcher = Callable[[Path, Path, tuple[str, ...]], components.Component]


def _started_from_config(
    tmp_path_factory: pytest.TempPathFactory, name: str, launch: Launcher
) -> Iterator[Callable[..., components.Component]]:
    """Yields ``start(config_yaml_text, files={"rules.yml": text}, extra_args=())`` -> a running ``name``.

    Each start gets its own directory; ``files`` are written next to ``<name>.yml`` so the
    config can name them relatively. Every component started is stopped afterwards.
    """
    started: list[components.Component] = []

    def start(config: str, files: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> components.Component:
        workdir = tmp_path_factory.mktemp(name)
        for file_name, text in (files or {}).items():
            (workdir / file_name).write_text(text)
        config_file = workdir / f"{name}.yml"
        config_file.write_text(config)
        component = launch(config_file, workdir, extra_args).start()
        started.append(component)
        return component

    yield start
    for component in started:
        component.stop()


@pytest.fixture
def start_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., components.Component]]:
    """Factory: ``start_prometheus(config_yaml_text, files={"rules.yml": text})`` -> running Prometheus."""
    yield from _started_from_config(tmp_path_factory, "prometheus", components.prometheus)


@pytest.fixture
def start_alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., components.Component]]:
    """Factory: ``start_alertmanager(config_yaml_text)`` -> running Alertmanager."""
    yield from _started_from_config(tmp_path_factory, "alertmanager", components.alertmanager)


@pytest.fixture
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[components.Component]:
    with components.pushgateway(tmp_path_factory.mktemp("pushgateway")) as component:
        yield component


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[components.Component]:
    with components.redis(tmp_path_factory.mktemp("redis")) as component:
        yield component


@pytest.fixture
def s3_server() -> Iterator[components.S3Server]:
    with components.S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def promtool() -> str:
    return components.find_binary("promtool")


@pytest.fixture(scope="session")
def amtool() -> str:
    return components.find_binary("amtool")
