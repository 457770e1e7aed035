"""Batch jobs run by systemd timers or cron: backup and restore, cleanup, health, maintain.

Every job exits 0 on success, 1 on failure, 2 on bad configuration and 3 when a safety
breaker stopped it, holds a lock so that two runs never overlap, and publishes its
completion metrics through :mod:`jobs.report`.
"""
