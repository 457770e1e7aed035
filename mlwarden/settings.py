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
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mlwarden.secrets import SecretError, read_secret

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

    @property
    def shown_default(self) -> str:
        """The default as an operator would write it; empty when there is none."""
        value = self.default
        if value is None or value == [] or value is dataclasses.MISSING:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
            return f"{value[0]}:{value[1]}"  # a listen address
        return str(value)


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
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are exceptions, so that the caller prints one line.

    argparse would print the whole usage block and exit; an operator who mistyped one flag
    needs the one line that says which, and exit status 2 from the caller.
    """

    def error(self, message: str) -> typing.NoReturn:
        raise SettingsError(message)


def suggestion(word: str, candidates: Sequence[str]) -> str:
    """`` (did you mean --compression?)`` for a near miss among ``candidates``, else empty."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def flags_of(cls: type, command: str) -> list[str]:
    """Every flag a settings class accepts, ``--no-`` forms included."""
    result = []
    for opt in options_of(cls, command):
        if opt.flag is None:
            continue
        result += [opt.flag, *opt.spec.aliases]
        if opt.is_bool:
            result += ["--no-" + name[2:] for name in (opt.flag, *opt.spec.aliases)]
    return result


def unrecognized(unknown: Sequence[str], flags: Sequence[str]) -> SettingsError:
    """The error for arguments no setting takes, with a suggestion for the first mistyped flag."""
    hints = (suggestion(token.split("=")[0], flags) for token in unknown if token.startswith("-"))
    hint = next((h for h in hints if h), "")
    return SettingsError("unrecognized arguments: " + " ".join(unknown) + hint)


def _help_text(opt: Option) -> str:
    parts = [opt.spec.help]
    if opt.required:
        parts.append("(required)")
    elif opt.shown_default:
        parts.append(f"(default: {opt.shown_default})")
    parts.append("[env " + " or ".join(opt.env_names) + "]")
    # argparse %-formats help strings: a literal % in a default or help must be doubled.
    return " ".join(parts).replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type, command: str, title: str | None = None) -> None:
    """Add one argparse argument per non-secret option. Values stay text until :func:`resolve`.

    Required options go into their own group so that help shows them apart (argparse's
    ``required=True`` would refuse a value that comes from the environment); the others go
    into a group named ``title``, or the parser's default one.
    """
    opts = [opt for opt in options_of(cls, command) if not opt.spec.secret]
    required = parser.add_argument_group("required (as a flag or in the environment)") if any(
        opt.required and not opt.spec.positional for opt in opts) else None
    optional = parser.add_argument_group(title) if title else parser
    for opt in opts:
        help_text = _help_text(opt)
        if opt.spec.positional:
            optional.add_argument(opt.name, nargs="?", default=None, help=help_text, metavar=opt.spec.metavar)
            continue
        assert opt.flag is not None  # only positionals and secrets have none
        target = required if required is not None and opt.required else optional
        # With choices and no metavar, argparse shows them: {zstd,gzip,none}.
        metavar = opt.spec.metavar or (None if opt.spec.choices else opt.name.upper())
        if opt.is_bool:
            target.add_argument(
                opt.flag,
                *opt.spec.aliases,
                dest=opt.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif opt.is_list:
            target.add_argument(
                opt.flag,
                *opt.spec.aliases,
                dest=opt.name,
                action="append",
                default=None,
                help=help_text + " (repeatable)",
                metavar=metavar,
            )
        else:
            target.add_argument(
                opt.flag,
                *opt.spec.aliases,
                dest=opt.name,
                default=None,
                help=help_text,
                metavar=metavar,
                choices=opt.spec.choices,
            )


def secrets_help(cls: type, command: str) -> str:
    """The help section that names the environment variables holding secrets (never flags)."""
    lines = [
        f"  {opt.env_names[0]} or {opt.env_names[0]}_FILE: {opt.spec.help}" + (" (required)" if opt.required else "")
        for opt in options_of(cls, command) if opt.spec.secret
    ]
    if not lines:
        return ""
    return "secrets (from the environment only, never flags; *_FILE names a file that holds the value):\n" + "\n".join(lines)


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
        _resolve_option(opt, args, environ, values)
    try:
        return cls(**values)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise SettingsError(str(exc)) from None


def resolve_fields(cls: type, command: str, names: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """Only the named settings of a command, from the environment or their defaults, as it would read them.

    For a part that must know a few settings of another command without running it (the
    exporter reads each job's schedule from the environment file they share); the other
    settings, required or not, and the cross-field checks are not looked at.
    """
    values: dict[str, Any] = {}
    for opt in options_of(cls, command):
        if opt.name in names:
            _resolve_option(opt, None, environ, values)
            values.setdefault(opt.name, opt.default)
    return values


def _resolve_option(opt: Option, args: argparse.Namespace | None, environ: Mapping[str, str], values: dict[str, Any]) -> None:
    """Put the option's value into ``values``; leave it out when unset, so that the default applies."""
    raw, source = _raw_value(opt, args, environ)
    if raw is None:
        if opt.required:
            names = " or ".join(n for n in (opt.flag, opt.env_names[0]) if n)
            raise SettingsError(f"{names} is required: {opt.spec.help}")
        return
    try:
        values[opt.name] = _convert(opt, raw)
    except ValueError as exc:
        shown = "(secret value not shown)" if opt.spec.secret else repr(raw)
        raise SettingsError(f"invalid {source}={shown}: {exc}") from None


def load(cls: type[T], command: str, argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> T:
    """Parse ``argv`` (flags only) and the environment into settings; for jobs run in-process."""
    parser = Parser(prog=f"mlwarden {command}", exit_on_error=False)
    add_arguments(parser, cls, command)
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise SettingsError(str(exc)) from None
    if unknown:
        raise unrecognized(unknown, flags_of(cls, command))
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
        if opt.spec.secret:
            try:
                secret = read_secret(name, environ)
            except SecretError as exc:
                raise SettingsError(str(exc)) from None
            if secret is not None:
                return secret, name
        elif name in environ:
            value = environ[name]
            return (_split_list(value) if opt.is_list else value), name
    return None, ""


def _split_list(value: str) -> list[str]:
    # Lists in environment variables are separated by commas or the OS path separator.
    return [part for part in re.split(f"[,{re.escape(os.pathsep)}]", value) if part.strip()]


def _convert(opt: Option, raw: str | list[str]) -> Any:
    if opt.is_list:
        items = raw if isinstance(raw, list) else _split_list(raw)
        return [_convert_one(opt, item.strip()) for item in items]
    assert isinstance(raw, str)
    return _convert_one(opt, raw.strip())


def _convert_one(opt: Option, text: str) -> Any:
    if opt.spec.choices and text not in opt.spec.choices:
        raise ValueError("expected one of " + ", ".join(opt.spec.choices) + suggestion(text, opt.spec.choices))
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
        return lambda text: parse_as(parse, text)
    return parse


def positive(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a parser (or int/float) so that zero and negative values are refused."""
    parse = _parser(parse)

    def checked(text: str) -> T:
        value = parse(text)
        if value <= 0:  # type: ignore[operator]  # T is a number: only numeric parsers are wrapped
            raise ValueError("must be greater than zero")
        return value

    return checked


def in_range(parse: Callable[[str], T], low: Any, high: Any) -> Callable[[str], T]:
    """Wrap a parser (or int/float) so that values outside ``low..high`` (inclusive) are refused."""
    parse = _parser(parse)

    def checked(text: str) -> T:
        value = parse(text)
        if not low <= value <= high:
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
