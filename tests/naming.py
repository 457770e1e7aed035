"""Which files name an extension (a collector, a notifier): the proof that its registration is all the wiring it needs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = re.compile(r"<!-- settings:([\w-]+) -->\n.*?<!-- /settings:\1 -->", re.S)
# What a real-GPU check printed (every series the exporter served): a record, not wiring.
RECORDED = "docs/real-gpu/"


def _text(relative: str) -> str:
    try:
        text = (REPO / relative).read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError):
        return ""
    return GENERATED.sub("", text)  # generated tables come from the registrations


def files_naming(pattern: re.Pattern[str], own: set[str]) -> list[str]:
    """The files of the repository (tracked or not yet, not ignored) other than ``own`` whose text matches ``pattern``."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert own <= set(listed), own - set(listed)  # the scan looks at the real tree
    return sorted(path for path in set(listed) - own if not path.startswith(RECORDED) and pattern.search(_text(path)))
