"""One collector per file: gpu, processes, xid, backups, artifacts."""
