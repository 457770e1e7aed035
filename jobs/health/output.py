"""Health results for people (a table) and for programs (JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from mlwarden.jobs.health.result import Result


def as_json(results: Sequence[Result]) -> str:
    healthy = all(r.ok for r in results)
    return json.dumps({"healthy": healthy, "checks": [r.to_dict() for r in results]}, indent=2)


def as_table(results: Sequence[Result]) -> str:
    rows = [("CHECK", "STATUS", "DETAIL")] + [(r.check, r.status.value.upper(), r.summary) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}" for row in rows]
    verdict = "healthy" if all(r.ok for r in results) else "NOT healthy"
    return "\n".join(lines + ["", f"machine is {verdict}"])
