"""JSON where there is a lot of it: the relay's webhook bodies, key states and notices, backup
manifests, botocore's service models.

orjson does these several times faster than the standard library (encoding a key state or a
notice: about 1 us instead of 8), which at hundreds of webhooks a second is a good part of a
core. What orjson refuses, the standard library does, so every caller accepts and stores exactly
what it did before: JSON that orjson rejects but Python reads (NaN, a lone UTF-16 surrogate
escape) is read by :mod:`json`, which also gives the error message
for a body that is not JSON at all; a value orjson cannot write (an integer beyond 64 bits, a
non-string key) is written by :mod:`json`. Both write compact UTF-8 (no ASCII escapes).

One difference stays: orjson reads an integer beyond 64 bits as a float. Nothing the relay
stores is one, and the only numbers in an Alertmanager payload are small; a manifest refuses a size
of 2**63 or more (mlwarden/catalog.py), so the two parsers never differ there.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


def encode(value: Any) -> str:
    """``value`` as compact JSON text."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def float_texts(values: list[Any]) -> list[str] | None:
    """``repr()`` of each of ``values``, made by one call of orjson (a tenth of the CPU of
    20,000 ``repr()`` calls); None unless every value is a float that both write alike: finite,
    and 0 or 1e-4 <= abs < 1e16, where repr writes no exponent and orjson the same digits."""
    if set(map(type, values)) != {float}:
        return None
    magnitudes = list(map(abs, values))
    if not all(map(math.isfinite, magnitudes)) or max(magnitudes) >= 1e16 or min(filter(None, magnitudes), default=1.0) < 1e-4:
        return None
    return orjson.dumps(values)[1:-1].decode("ascii").split(",")


def decode(data: bytes | str) -> Any:
    """The value of the JSON document ``data``; raises ValueError (the standard library's, so its
    message says where the document went wrong) or RecursionError when it is not one."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
