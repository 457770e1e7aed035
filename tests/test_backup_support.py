"""Helpers shared by the backup and restore tests (no tests here): small model-like data, the CLI,
and the ``s3_env`` fixture (import it where it is used)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from mlwarden import cli, components
from mlwarden.catalog import Catalog

SIGNAL_IN_FORK: list[signal.Signals] = []  # armed by a test: the signal this process sends itself when it next forks


def _signal_in_fork() -> None:
    if SIGNAL_IN_FORK:
        os.kill(os.getpid(), SIGNAL_IN_FORK.pop())


os.register_at_fork(after_in_parent=_signal_in_fork)  # at-fork handlers cannot be removed: armed per test

def make_models(directory: Path, weights_bytes: int = 300_000, seed: int = 0) -> Path:
    """A tiny model directory: random weights in a subdirectory, JSON configs, a tokenizer."""
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    (directory / "shards" / "model-00001.safetensors").write_bytes(rng.randbytes(weights_bytes))
    (directory / "shards" / "model-00002.safetensors").write_bytes(rng.randbytes(weights_bytes // 3))
    (directory / "config.json").write_text(json.dumps({"hidden_size": 64, "seed": seed}))
    (directory / "tokenizer.json").write_text(json.dumps({"vocab": [f"t{i}" for i in range(200)]}))
    return directory


def mlwarden(*argv: str | Path) -> int:
    """Run ``mlwarden ARGV...`` in-process and return its exit status (argparse's exit included)."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)


def backup(model_dir: Path, backup_dir: Path, *extra: str | Path) -> int:
    return mlwarden("backup", "--model-dir", model_dir, "--backup-dir", backup_dir, *extra)


def only_entry(backup_dir: Path):  # type: ignore[no-untyped-def]  # a helper whose return type is the catalog's entry, imported lazily
    entries = Catalog(backup_dir).entries()
    assert len(entries) == 1, entries
    return entries[0]


def flip_byte(path: Path, offset_from_end: int = 1000) -> None:
    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        position = max(size - offset_from_end, size // 2)
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0x01]))


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> content)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def hard_links(directory: Path) -> set[frozenset[str]]:
    """The files under ``directory`` that are one file under several names: each group's relative paths."""
    groups: dict[tuple[int, int], set[str]] = {}
    for root, _, names in os.walk(directory):
        for name in names:
            info = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                groups.setdefault((info.st_dev, info.st_ino), set()).add(Path(root, name).relative_to(directory).as_posix())
    return {frozenset(group) for group in groups.values() if len(group) > 1}


def forget_pushed(pushgateway_url: str, job: str) -> None:
    """Delete ``job``'s group: Debian's Pushgateway persists to /var/lib by default, so a fresh
    process can start with what an earlier test pushed."""
    url = f"{pushgateway_url}/metrics/job/{job}/instance/{socket.gethostname()}"
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5).read()


def pushed(pushgateway_url: str, job: str) -> dict[str, float]:
    """The series the Pushgateway holds for ``job`` from this host: metric name -> value."""
    text = urllib.request.urlopen(pushgateway_url + "/metrics", timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)\{([^}]*)\} (\S+)$", line)
        labels = match.group(2).split(",") if match else []
        if match and f'job="{job}"' in labels and f'instance="{socket.gethostname()}"' in labels:
            found[match.group(1)] = float(match.group(3))
    return found


@pytest.fixture
def s3_env(s3_server: components.S3Server, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A fresh bucket on the S3 server, and the restore/backup flags that point at it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"restore-{uuid.uuid4().hex[:12]}"  # moto keeps buckets across servers in one process
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=bucket)
    return ["--s3-bucket", bucket, "--s3-prefix", "fleet/node-7", "--s3-endpoint-url", s3_server.url, "--s3-retry-base", "0.05"]
