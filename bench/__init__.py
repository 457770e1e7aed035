"""Benchmarks: each runs its baseline side by side in the same process run and reports ratios."""
