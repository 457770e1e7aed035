"""The wheel is complete: built from this tree and installed into a fresh virtual environment
outside the repository, it imports as ``mlwarden`` only, carries every asset, and runs the demo.

The fresh environment gets mlwarden itself from the wheel only; its dependencies are borrowed
from the test's own environment through a path entry (not its .pth hooks, so the editable
install of the checkout stays out), which keeps the test fast and needs no network.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import fresh_clone
import pytest

import mlwarden
from mlwarden import assets


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    source = fresh_clone.copy_to(tmp_path_factory.mktemp("clone"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source)],
        check=True, cwd=dist,
    )
    (built,) = dist.glob("mlwarden-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the repository with the wheel installed; returns its bin/."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(home), "platbase": str(home)}))
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(home / "bin" / "python"), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        check=True, cwd=home,
    )
    return home / "bin"


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_wheel_installs_one_top_level_package_with_metadata_from_one_place(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(name.rsplit("/", 1)[0] for name in names if name.endswith(".dist-info/METADATA"))
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
    assert top_level == ["mlwarden"]
    assert {name.split("/")[0] for name in names} == {"mlwarden", info}
    assert metadata["Version"] == mlwarden.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert f"{info}/licenses/LICENSE" in names


def test_wheel_carries_every_asset_of_the_checkout(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        expected = set()
        for relative, resource in assets.walk():
            top = relative.parts[0]
            inside = f"mlwarden/relay/{relative.name}" if top == "relay" else f"mlwarden/assets/{relative}"
            expected.add(inside)
            if inside in names:
                assert archive.read(inside) == resource.read_bytes(), inside
    assert expected - names == set()
    for must in ("alerts/rules/gpu.yml", "alerts/tests/gpu.test.yml", "alerts/alertmanager.yml",
                 "alerts/prometheus.yml", "dashboards/gpu-fleet.json", "deploy/systemd/mlwarden-exporter.service",
                 "deploy/kubernetes/base/kustomization.yaml", "deploy/kubernetes/base/prometheusrule.yaml",
                 "deploy/kubernetes/base/relay.yml", "deploy/kubernetes/overlays/host-pid/kustomization.yaml"):
        assert f"mlwarden/assets/{must}" in names
    assert "mlwarden/relay/relay.example.yml" in names


def test_installed_wheel_exports_the_assets_and_runs_the_demo(installed: Path, tmp_path: Path) -> None:
    env = _clean_env()
    where = subprocess.run(
        [str(installed / "python"), "-c", "import mlwarden.assets as a; print(a.folder('alerts'))"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=env,
    ).stdout.strip()
    assert where.startswith(str(installed.parent)) and where.endswith("mlwarden/assets/alerts")

    exported = tmp_path / "exported"
    subprocess.run([str(installed / "mlwarden"), "assets", "export", str(exported)], check=True, cwd=tmp_path, env=env)
    for relative, resource in assets.walk():
        assert (exported / relative).read_bytes() == resource.read_bytes(), relative

    demo = subprocess.run(
        [str(installed / "mlwarden"), "demo"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "FAIL" not in demo.stdout and "stack stopped" in demo.stdout
