"""Value types of relay.yml shared by its schema and by each notifier's destination model.

A neutral module: :mod:`relay.schema` builds the document from every registered notifier, and
the notifiers declare their keys with these types, so neither imports the other.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema

from mlwarden.settings import parse_duration


class ConfigError(ValueError):
    """relay.yml cannot be used; the message is one line naming the key."""


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a duration such as 30s or 15m, got {value!r}")
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise ValueError(f"expected a duration such as 30s or 15m: {exc}") from None


def _whole(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _positive(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"expected a number greater than zero, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    # YAML reads `gpu: 0` as a number; a label value is text all the same.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return str(value)


Duration = Annotated[
    float, BeforeValidator(_duration),
    WithJsonSchema({"type": ["string", "number"], "description": "a duration: 500ms, 30s, 15m, 1h30m, 1d"}),
]
Whole = Annotated[int, BeforeValidator(_whole), WithJsonSchema({"type": "integer", "minimum": 1})]
Positive = Annotated[float, BeforeValidator(_positive), WithJsonSchema({"type": "number", "exclusiveMinimum": 0})]
Text = Annotated[str, BeforeValidator(_text), WithJsonSchema({"type": ["string", "number"], "minLength": 1})]


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
