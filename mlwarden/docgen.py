"""Keep the documentation's configuration tables true: they are generated from the settings classes.

``python -m mlwarden.docgen`` rewrites every block between ``<!-- settings:NAME -->`` and
``<!-- /settings:NAME -->`` in README.md and docs/*.md; ``--check`` exits 1 if any is stale
or missing (the test suite runs it, so a new flag without documentation fails the build).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mlwarden import cli, registry, settings

REPO = Path(__file__).resolve().parent.parent


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _default_text(opt: settings.Option) -> str:
    if opt.spec.secret:
        return "(secret: env or `_FILE` only)"
    if opt.required:
        return "required"
    shown = opt.shown_default
    return shown if not shown or isinstance(opt.default, bool) else f"`{shown}`"


def table(settings_cls: type, command: str) -> str:
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for opt in settings.options_of(settings_cls, command):
        if opt.spec.secret:
            flag = "—"
        elif opt.spec.positional:
            flag = f"`{opt.spec.metavar or opt.name.upper()}` (argument)"
        elif opt.is_bool and opt.flag:
            flag = ", ".join(f"`{name}` / `--no-{name[2:]}`" for name in (opt.flag, *opt.spec.aliases))
        else:
            flag = ", ".join(f"`{name}`" for name in (opt.flag, *opt.spec.aliases))
        env = ", ".join(f"`{n}`" for n in opt.env_names)
        if opt.spec.secret:
            env += f", `{opt.env_names[0]}_FILE`"
        meaning = opt.spec.help
        if opt.spec.choices:
            meaning += " (" + ", ".join(opt.spec.choices) + ")"
        rows.append(f"| {flag} | {env} | {_default_text(opt)} | {meaning} |")
    return "\n".join(rows)


# Tables of the registries in the design's other parts: (block, part, module in it, function).
EXTENSION_TABLES = (
    ("exporter-collectors", "mlwarden.exporter", "collectors.base", "collectors_table"),
)


def blocks() -> dict[str, str]:
    result = {"common": table(cli.CommonSettings, cli.COMMON_PREFIX)}
    for name, entry in registry.entries().items():
        result[name] = table(entry.load().settings, name)
    for name, part, module, function in EXTENSION_TABLES:
        # By name, as the registry loads commands (those parts are outside the typed package); a
        # part this interpreter cannot import (a checkout without the install) has no commands
        # in the registry either, so neither is checked.
        if importlib.util.find_spec(part) is not None:
            result[name] = getattr(importlib.import_module(f"{part}.{module}"), function)()
    return result


def render(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- settings:{name} -->\n).*?(<!-- /settings:{name} -->)", re.S)
        text = pattern.sub(_block_filler(body), text)
    return text


def _block_filler(body: str) -> Callable[[re.Match[str]], str]:
    # A function, not the text: re.sub would read backslashes in a table as escapes.
    return lambda match: match.group(1) + body + "\n" + match.group(2)


def missing_blocks(texts: list[str], generated: dict[str, str]) -> list[str]:
    return [name for name in generated if not any(f"<!-- settings:{name} -->" in t for t in texts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale or missing")
    args = parser.parse_args(argv)
    generated = blocks()
    texts = {page: page.read_text(encoding="utf-8") for page in pages()}
    stale = [page.name for page, text in texts.items() if render(text, generated) != text]
    missing = missing_blocks(list(texts.values()), generated)
    if args.check:
        if stale or missing:
            print("configuration tables are stale or missing "
                  f"({', '.join(stale + missing)}): run python -m mlwarden.docgen", file=sys.stderr)
            return 1
        return 0
    for page, text in texts.items():
        page.write_text(render(text, generated), encoding="utf-8")
    if missing:
        print("add markers to a page of docs/ for: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
