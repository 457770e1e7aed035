"""``mlwarden assets``: one place says where the operator's files are; export never clobbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlwarden import assets, cli
from mlwarden.assets.cli import export

REPO = Path(__file__).resolve().parent.parent


def test_a_checkout_reads_its_own_folders() -> None:
    assert Path(str(assets.folder("alerts"))) == REPO / "alerts"
    assert Path(str(assets.relay_example())) == REPO / "relay" / "relay.example.yml"
    shipped = {str(relative) for relative, _ in assets.walk()}
    assert "alerts/rules/gpu.yml" in shipped and "dashboards/relay.json" in shipped
    assert not any(name.endswith(".py") or "__pycache__" in name for name in shipped)


def test_unknown_folder_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown asset folder 'rules'"):
        assets.folder("rules")


def test_export_writes_every_asset_in_the_checkout_layout(tmp_path: Path) -> None:
    assert cli.main(["assets", "export", str(tmp_path / "out")]) == 0
    for relative, resource in assets.walk():
        assert (tmp_path / "out" / relative).read_bytes() == resource.read_bytes()


def test_export_refuses_before_writing_anything_when_a_file_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited = tmp_path / "alerts" / "rules" / "gpu.yml"
    edited.parent.mkdir(parents=True)
    edited.write_text("my edits\n")
    assert cli.main(["assets", "export", str(tmp_path)]) == 2
    assert "1 file(s) already exist" in capsys.readouterr().err
    assert edited.read_text() == "my edits\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [Path("alerts/rules/gpu.yml")]
    export(tmp_path, force=True)
    assert edited.read_bytes() == (REPO / "alerts" / "rules" / "gpu.yml").read_bytes()


def test_export_without_a_directory_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["assets", "export"]) == 2
    assert "needs a directory" in capsys.readouterr().err
