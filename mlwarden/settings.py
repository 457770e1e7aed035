"""Declarative settings: every option is a command-line flag and an environment variable.

A command describes its settings as a frozen dataclass whose fields are made with
:func:`setting`. :func:`load` reads flags, then environment variables (the primary
``MLWARDEN_<COMMAND>_<NAME>`` name, then the legacy names of the shell scripts users come
from), then the default, and validates everything before the command touches anything.
A bad value raises :class:`SettingsError` with one line naming the setting; the CLI turns
that into exit status 2.

Secrets are never flags (a flag shows up in ``ps`` and shell history): they come from an
environment variable or from a file named by ``<VAR>_FILE``, and their values are
registered with :mod:`mlwarden.logs` so that no log line can carry them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mlwarden import logs

T = TypeVar("T")

_META_KEY = "mlwarden_setting"

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


class SettingsError(ValueError):
    """A setting has a value the command cannot use. The message is one line for the operator."""


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    help: str
    env: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False
    positional: bool = False
    metavar: str | None = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    env: Sequence[str] = (),
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    secret: bool = False,
    positional: bool = False,
    metavar: str | None = None,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one setting of a settings dataclass.

    ``env`` lists extra (legacy) environment variable names, tried after the primary name.
    ``parse`` turns the text into a value and raises ``ValueError`` with a short reason;
    without it the field's annotation decides (str, int, float, bool, Path, list[...]).
    ``flag`` overrides the generated ``--kebab-name``; ``aliases`` are further flags for it
    (the names other tools use, e.g. node_exporter's ``--web.listen-address``).
    """
    spec = SettingSpec(
        help=help,
        env=tuple(env),
        parse=parse,
        choices=tuple(choices) if choices else None,
        secret=secret,
        positional=positional,
        metavar=metavar,
        flag=flag,
        aliases=tuple(aliases),
    )
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={_META_KEY: spec})
    return dataclasses.field(default=default, metadata={_META_KEY: spec})


@dataclasses.dataclass(frozen=True)
class Option:
    """One resolved description of a setting, used for parsing and for the README tables."""

    name: str
    flag: str | None
    env_names: tuple[str, ...]
    spec: SettingSpec
    annotation: Any
    default: Any

    @property
    def is_list(self) -> bool:
        return _origin(self.annotation) is list

    @property
    def is_bool(self) -> bool:
        return _base_type(self.annotation) is bool and not self.is_list

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def options_of(cls: type, command: str) -> list[Option]:
    """The options of a settings dataclass, with their flag and environment variable names."""
    hints = typing.get_type_hints(cls)
    prefix = env_prefix(command)
    result = []
    for field in dataclasses.fields(cls):
        spec: SettingSpec | None = field.metadata.get(_META_KEY)
        if spec is None:
            continue
        primary = prefix + field.name.upper()
        if spec.positional:
            flag = None
        else:
            flag = spec.flag or "--" + field.name.replace("_", "-")
        default: Any = field.default
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        result.append(
            Option(
                name=field.name,
                flag=None if spec.secret else flag,
                env_names=(primary, *spec.env),
                spec=spec,
                annotation=hints[field.name],
                default=default,
            )
        )
    return result


def env_prefix(command: str) -> str:
    """``backup`` -> ``MLWARDEN_BACKUP_``; the empty command (options every command has) -> ``MLWARDEN_``."""
    slug = re.sub(r"[^A-Z0-9]+", "_", command.upper()).strip("_")
    return f"MLWARDEN_{slug}_" if slug else "MLWARDEN_"


def add_arguments(parser: argparse.ArgumentParser, cls: type, command: str) -> None:
    """Add one argparse argument per non-secret option. Values stay text until :func:`resolve`."""
    for opt in options_of(cls, command):
        if opt.spec.secret:
            continue
        help_text = f"{opt.spec.help} [env {opt.env_names[0]}]"
        if opt.spec.positional:
            parser.add_argument(
                opt.name, nargs="?", default=None, help=help_text, metavar=opt.spec.metavar
            )
        elif opt.is_bool:
            parser.add_argument(
                opt.flag,
                *opt.spec.aliases,
                dest=opt.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif opt.is_list:
            parser.add_argument(
                opt.flag,
                *opt.spec.aliases,
                dest=opt.name,
                action="append",
                default=None,
                help=help_text + " (repeatable)",
                metavar=opt.spec.metavar or opt.name.upper(),
            )
        else:
            parser.add_argument(
                opt.flag,
                *opt.spec.aliases,
                dest=opt.name,
                default=None,
                help=help_text,
                metavar=opt.spec.metavar or opt.name.upper(),
                choices=opt.spec.choices,
            )


def resolve(
    cls: type[T],
    command: str,
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build the settings object from parsed flags, the environment and defaults.

    Raises :class:`SettingsError` naming the flag or variable whose value is wrong.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options_of(cls, command):
        raw, source = _raw_value(opt, args, environ)
        if raw is None:
            if opt.required:
                names = " or ".join(n for n in (opt.flag, opt.env_names[0]) if n)
                raise SettingsError(f"{names} is required: {opt.spec.help}")
            continue
        try:
            values[opt.name] = _convert(opt, raw)
        except ValueError as exc:
            shown = "(secret value not shown)" if opt.spec.secret else repr(raw)
            raise SettingsError(f"invalid {source}={shown}: {exc}") from None
        if opt.spec.secret and values[opt.name]:
            logs.register_secret(values[opt.name])
    try:
        return cls(**values)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise SettingsError(str(exc)) from None


def load(cls: type[T], command: str, argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> T:
    """Parse ``argv`` (flags only) and the environment into settings; for jobs run in-process."""
    parser = argparse.ArgumentParser(prog=f"mlwarden {command}", exit_on_error=False)
    add_arguments(parser, cls, command)
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise SettingsError(str(exc)) from None
    if unknown:
        raise SettingsError("unrecognized arguments: " + " ".join(unknown))
    return resolve(cls, command, args, environ)


def _raw_value(
    opt: Option, args: argparse.Namespace | None, environ: Mapping[str, str]
) -> tuple[str | list[str] | None, str]:
    if args is not None and not opt.spec.secret:
        value = getattr(args, opt.name, None)
        if value is not None:
            if isinstance(value, bool):
                value = "true" if value else "false"
            return value, opt.flag or opt.name
    for name in opt.env_names:
        if name in environ:
            value = environ[name]
            return (_split_list(value) if opt.is_list else value), name
        if opt.spec.secret and f"{name}_FILE" in environ:
            return _read_secret_file(environ[f"{name}_FILE"], name), f"{name}_FILE"
    return None, ""


def _read_secret_file(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"cannot read {name}_FILE={path!r}: {exc.strerror}") from None


def _split_list(value: str) -> list[str]:
    # Lists in environment variables are separated by commas or the OS path separator.
    return [part for part in re.split(r"[,%s]" % re.escape(os.pathsep), value) if part.strip()]


def _convert(opt: Option, raw: str | list[str]) -> Any:
    if opt.is_list:
        items = raw if isinstance(raw, list) else _split_list(raw)
        return [_convert_one(opt, item.strip()) for item in items]
    assert isinstance(raw, str)
    return _convert_one(opt, raw.strip())


def _convert_one(opt: Option, text: str) -> Any:
    if opt.spec.choices and text not in opt.spec.choices:
        raise ValueError("expected one of " + ", ".join(opt.spec.choices))
    if opt.spec.parse is not None:
        return opt.spec.parse(text)
    return parse_as(_base_type(opt.annotation), text)


def parse_as(kind: Any, text: str) -> Any:
    """Convert text to ``kind`` (str, int, float, bool or Path) with an operator-friendly error."""
    if kind is bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("expected true or false (1/0, yes/no, on/off)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind is Path:
        if not text:
            raise ValueError("expected a path, got an empty value")
        return Path(text).expanduser()
    return text


def _origin(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _origin(inner[0]) if len(inner) == 1 else origin
    return origin


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(inner[0]) if len(inner) == 1 else str
    if origin is list:
        return _base_type(typing.get_args(annotation)[0])
    return annotation


# Parsers shared by several commands -------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    """``500GB``, ``1.5GiB``, ``1000`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 500GB, 1.5GiB or 1000 (bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str) -> float:
    """``15m``, ``1h30m``, ``2.5``, ``500ms`` -> seconds. A bare number is seconds."""
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|[smhdw]?)", text.strip().lower())
    rebuilt = "".join(n + u for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", text.strip().lower()):
        raise ValueError("expected a duration such as 30s, 15m, 1h30m or 2.5 (seconds)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _parser(parse: Callable[[str], T]) -> Callable[[str], T]:
    # int and float as parsers would leak Python's "invalid literal" wording to operators.
    if parse in (int, float):
        return lambda text: parse_as(parse, text)  # type: ignore[return-value]
    return parse


def positive(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a parser (or int/float) so that zero and negative values are refused."""
    parse = _parser(parse)

    def checked(text: str) -> T:
        value = parse(text)
        if value <= 0:  # type: ignore[operator]
            raise ValueError("must be greater than zero")
        return value

    return checked


def in_range(parse: Callable[[str], T], low: Any, high: Any) -> Callable[[str], T]:
    """Wrap a parser (or int/float) so that values outside ``low..high`` (inclusive) are refused."""
    parse = _parser(parse)

    def checked(text: str) -> T:
        value = parse(text)
        if not low <= value <= high:  # type: ignore[operator]
            raise ValueError(f"must be from {low} to {high}")
        return value

    return checked


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9945`` for IPv6, ``:9945`` for all interfaces) -> (host, port)."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):([0-9]{1,5})", text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9945 or :9945")
    host = match.group(1).strip("[]") or "0.0.0.0"
    return host, int(match.group(2))


def parse_url(text: str) -> str:
    """An http(s) URL, without a trailing slash."""
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("expected an http:// or https:// URL")
    return text.rstrip("/")
