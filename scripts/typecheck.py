"""Run mypy --strict over the whole `mlwarden` namespace as it is installed.

pyproject.toml maps the top-level folders exporter/, relay/ and jobs/ into `mlwarden.*`
(`package-dir`); mypy cannot follow that mapping, nor setuptools' editable-install import hook.
So this builds the installed layout as a tree of symbolic links (rebuilt on every run, so new
files are seen) and checks that tree with the project's mypy configuration.

Usage: .venv/bin/python scripts/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAPPED = {"exporter": "exporter", "relay": "relay", "jobs": "jobs"}


def build_tree(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    package = root / "mlwarden"
    package.mkdir(parents=True)
    for entry in (REPO / "mlwarden").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (package / name).symlink_to(REPO / folder)
    return root


def main(argv: list[str]) -> int:
    venv = Path(sys.prefix)
    tree = build_tree(venv / "typecheck-tree")
    mypy = Path(sys.executable).parent / "mypy"
    command = [
        str(mypy), "--config-file", str(REPO / "pyproject.toml"),
        "--cache-dir", str(venv / ".mypy_cache"), "-p", "mlwarden", *argv,
    ]
    # mypy prints paths inside the link tree; these name the same files as the checkout.
    return subprocess.run(command, cwd=tree, env={**os.environ, "MYPYPATH": str(tree)}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
