"""The mlwarden Prometheus exporter: GPU health from NVML plus backup and artifact state.

Collection runs in the background (:mod:`exporter.loop`); a scrape only returns the bytes
of the latest snapshot (:mod:`exporter.server`).
"""
