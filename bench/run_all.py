"""Run the benchmarks and write docs/benchmarks.md.

Every ``bench/bench_<name>.py`` exposes ``run(quick: bool) -> str``, which measures the
project against its baseline in the same run and returns a Markdown section (a table of
ratios and the command that reproduces it). This runner adds the machine's description
and writes each section between ``<!-- bench:<name> -->`` markers, so that running one
benchmark (``--only backup``) updates its section and keeps the others.

    python -m bench.run_all [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import os
import platform
import re
import sys
import time
from pathlib import Path

from mlwarden.fsutil import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Each benchmark runs the project and its baseline side by side in the same run, on the same
data, because these machines are shared and noisy: the figures that matter are the ratios.
Regenerate everything with `make bench` (or `python -m bench.run_all`), or one section with
`python -m bench.run_all --only NAME`.
"""


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB memory, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def section(name: str, body: str) -> str:
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    return (
        f"<!-- bench:{name} -->\n{body.strip()}\n\n"
        f"_Measured {stamp} on {machine()}._\n<!-- /bench:{name} -->"
    )


def merge(text: str, name: str, new_section: str) -> str:
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: new_section, text)
    return text.rstrip() + "\n\n" + new_section + "\n"


def compile_project() -> None:
    """Byte-compile the project's modules, as a wheel install is. With PYTHONDONTWRITEBYTECODE
    set (some CI and development shells set it) every measured command would compile its
    modules anew: about 0.15 s of CPU per process start that no installed copy pays."""
    for folder in ("mlwarden", "jobs", "exporter", "relay"):
        compileall.compile_dir(ROOT / folder, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=available(), help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller data, for a smoke run")
    args = parser.parse_args(argv)
    compile_project()
    for name in args.only or available():
        print(f"bench: running {name}", file=sys.stderr)
        module = importlib.import_module(f"bench.bench_{name}")
        body = section(name, module.run(quick=args.quick))
        # Read the file only now, right before writing: a benchmark runs for minutes, and
        # another run may have written its own section meanwhile.
        text = OUTPUT.read_text() if OUTPUT.exists() else HEADER
        atomic_write_text(OUTPUT, merge(text, name, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
