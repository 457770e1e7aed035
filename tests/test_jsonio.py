"""The JSON helper (mlwarden/jsonio.py): orjson where it can, the standard library for the
rest, so its callers read and write exactly what they did with the standard library alone."""

from __future__ import annotations

import json
import random

import pytest
from mlwarden.relay import payload
from mlwarden.relay.notice import Notice
from mlwarden.relay.policy import KeyState

from mlwarden import jsonio
from tests.test_relay_support import alert, body


@pytest.mark.parametrize(
    "value",
    [
        {"label": "温度 nöde\u200b1 \U0001F525 \u202e", "control": "\x00\x1f\n\"\\"},
        [2**63 - 1, -(2**63), 2**64 - 1, 0, -1],  # the 64-bit edges orjson reads as integers
        [2**70, -(2**70)],  # beyond them: orjson cannot write it, the standard library does
        {"first_seen": 1764000000.123456, "tiny": 5e-324, "none": None, "yes": True},
    ],
)
def test_what_is_written_reads_back_the_same(value: object) -> None:
    text = jsonio.encode(value)
    assert json.loads(text) == value  # plain JSON, as the standard library reads it
    if value != [2**70, -(2**70)]:  # orjson reads integers beyond 64 bits as floats (see jsonio)
        assert jsonio.decode(text) == value
    assert jsonio.decode(text.encode()) == jsonio.decode(text)


def test_output_is_compact_utf8_like_the_standard_librarys() -> None:
    value = {"a": ["é", "\u2028", 1.5, None], "b": {"c": "\x1f"}}
    assert jsonio.encode(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert jsonio.encode({1: "non-string key"}) == '{"1":"non-string key"}'  # written by the standard library


def test_what_orjson_refuses_the_standard_library_still_reads() -> None:
    assert jsonio.decode(b'"x\\ud800y"') == "x\ud800y"  # a lone surrogate escape
    assert jsonio.decode(b"[NaN]")[0] != jsonio.decode(b"[NaN]")[0]
    deep = b'{"alerts": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # too deep for either: a clear 400, not a crash
    with pytest.raises(payload.PayloadError, match="^body is not valid JSON"):
        payload.parse(deep)


def test_errors_are_the_standard_librarys_with_where_the_body_went_wrong() -> None:
    with pytest.raises(ValueError) as caught:
        jsonio.decode(b'{"alerts": [}')
    assert str(caught.value) == "Expecting value: line 1 column 13 (char 12)"
    with pytest.raises(payload.PayloadError, match=r"^body is not valid JSON: Expecting value: line 1 column 13"):
        payload.parse(b'{"alerts": [}')
    with pytest.raises(payload.PayloadError, match="^body is not valid JSON"):
        payload.parse(b"\xff\xfe{}")


def test_key_states_and_notices_round_trip() -> None:
    state = KeyState(key="k", severity="critical", first_seen=1.5, last_seen=2.25, last_notified=None, told=("ops", "pd"),
                     labels={"instance": "nöde1", "gpu": "3"}, acked_by="Zoë")
    assert KeyState.from_dict(jsonio.decode(jsonio.encode(state.to_dict()))) == state
    [parsed] = payload.parse(body(alert(instance="nöde\u200b1", mount="/data/温度"))).alerts
    notice = Notice(kind="firing", key="k", alertname="A", severity="warning", labels=parsed.labels,
                    annotations=parsed.annotations, members=({"mount": "/a"}, {"mount": "/b"}), occurrences=2**40)
    assert Notice.from_dict(jsonio.decode(jsonio.encode(notice.to_dict()))) == notice


def test_float_texts_are_what_repr_writes_or_none() -> None:
    """orjson's digits, where repr() writes no exponent, are repr()'s (mtimes of every era, and
    random magnitudes); anything else is None, for repr() one by one."""
    rng = random.Random(14)
    values = [0.0, -0.0, 1e-4, 9.999999999999998e15, 1764000000.0, 1764499736.1234567, 0.1, -1.5]
    values += [10 ** rng.uniform(-4, 15.99) * rng.choice((1, -1)) for _ in range(20_000)]
    values += [rng.uniform(0, 2e9) for _ in range(20_000)]
    assert jsonio.float_texts(values) == [repr(v) for v in values]
    for bad in (1e16, 5e-5, float("nan"), float("inf"), 17, True, "1.0", None):
        assert jsonio.float_texts([1.0, bad]) is None, bad  # what a record from elsewhere could hold
