"""The alert relay: Alertmanager webhooks in; per-key cooldown and escalation; Slack and PagerDuty out.

intake (app.py) -> dedup -> policy -> durable outbox (store/) -> outbox workers -> notifiers/
"""
