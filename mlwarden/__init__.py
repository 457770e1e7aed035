"""mlwarden: keeps GPU machines healthy and their models safe.

This package holds what the exporter, the relay and the jobs share: the ``mlwarden``
command, settings, logging, the backup catalog format, file and lock helpers, and the
launcher for the real Prometheus tools that the demo and the tests start.
"""

__version__ = "0.1.0"
