"""Benchmarks: each runs its baseline side by side in the same process run and reports ratios."""


def targets_table(checks: list[tuple[str, bool, str]]) -> list[str]:
    """The "target | met | measured" table every benchmark report ends with (a miss in bold)."""
    return [
        "| target | met | measured |",
        "| --- | --- | --- |",
        *(f"| {what} | {'yes' if ok else '**no**'} | {value} |" for what, ok, value in checks),
    ]
