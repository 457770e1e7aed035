"""``mlwarden health``: small checks (one per module) whose answers are metrics."""
