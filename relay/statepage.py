"""The state page: every firing key with its level and acknowledgement, and a form to acknowledge."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from urllib.parse import quote

from mlwarden.relay.policy import KeyState

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mlwarden relay: alert keys</title>
<style>body{{font-family:sans-serif}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px}}</style>
</head><body><h1>Firing alert keys ({count})</h1>
<table><tr><th>key</th><th>labels</th><th>severity</th><th>level</th><th>seen</th><th>firing since (UTC)</th>
<th>acknowledged</th></tr>
{rows}
</table></body></html>
"""

_ACK_FORM = (
    '<form method="post" action="/api/v1/keys/{key}/ack">'
    '<input name="by" placeholder="your name" required> <input name="comment" placeholder="comment">'
    ' <button>Acknowledge</button></form>'
)


def render(states: Sequence[KeyState], now: float) -> str:
    return _PAGE.format(count=len(states), rows="\n".join(_row(state) for state in states))


def _row(state: KeyState) -> str:
    labels = ", ".join(f"{name}={value}" for name, value in state.labels.items())
    if state.acked_at is not None:
        acked = f"by {state.acked_by} at {utc(state.acked_at)}" + (f": {state.ack_comment}" if state.ack_comment else "")
        ack_cell = html.escape(acked)
    else:
        ack_cell = _ACK_FORM.format(key=html.escape(quote(state.key, safe="")))
    cells = [html.escape(state.key), html.escape(labels), html.escape(state.severity), str(state.level),
             str(state.seen), utc(state.first_seen)]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + f"<td>{ack_cell}</td></tr>"


def utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
