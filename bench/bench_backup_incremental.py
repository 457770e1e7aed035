"""The second backup of an unchanged model directory against the first, side by side.

Format 3 stores content once and the files cache skips reading unchanged files, so a daily
backup of a model store that did not change should cost seconds and store next to nothing.
Both runs are the real command (process start included, verification on) with an off-site
copy to a local S3 server (moto), on the same generated checkpoint as ``bench_backup``;
the figures are the second run's time, CPU, bytes written and bytes uploaded as a fraction
of the first's. A third run after one shard was rewritten (a fine-tuning step) shows what a
real change costs.

    python -m bench.run_all --only backup_incremental [--quick]
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from mlwarden.jobs.backup.dedup import CLOCK_GRANULARITY_NS

from bench import targets_table
from bench.bench_backup import ROOT, generate
from mlwarden import components
from mlwarden.catalog import Catalog


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _uploaded(s3: object, bucket: str, name: str) -> int:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"bench/{name}/")  # type: ignore[attr-defined]  # a boto3 client
    return sum(obj["Size"] for obj in listing.get("Contents", []))


def _backup(source: Path, backups: Path, s3_args: list[str]) -> tuple[float, float, int]:
    """One ``mlwarden backup``: wall seconds, CPU seconds, and the bytes it added to the backup directory."""
    before_bytes = _tree_bytes(backups) if backups.exists() else 0
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [sys.executable, "-m", "mlwarden.cli", "backup", "--model-dir", str(source), "--backup-dir", str(backups), "--period", "run"]
    argv += ["--log-level", "warning", *s3_args]
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return seconds, cpu, _tree_bytes(backups) - before_bytes


def run(quick: bool) -> str:
    total = (100 if quick else 300) * 10**6
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        source = work / "model"
        size = generate(source, total)
        time.sleep(CLOCK_GRANULARITY_NS / 1e9 + 0.1)  # files older than the cache's clock tick, as a day-old store is
        with components.S3Server() as server:
            s3 = boto3.client("s3", endpoint_url=server.url)
            s3.create_bucket(Bucket="bench")
            s3_args = ["--s3-bucket", "bench", "--s3-prefix", "bench", "--s3-endpoint-url", server.url]
            backups = work / "backups"
            runs = {}
            for label in ("first", "second"):
                runs[label] = _backup(source, backups, s3_args)
            shard = next((source / "checkpoint").iterdir())
            shard.write_bytes(os.urandom(shard.stat().st_size))
            runs["changed"] = _backup(source, backups, s3_args)
            names = [e.name for e in Catalog(backups).entries()]
            uploaded = dict(zip(runs, (_uploaded(s3, "bench", name) for name in names), strict=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first_s, _, first_written = runs["first"]

    def row(label: str, key: str) -> str:
        seconds, cpu, written = runs[key]
        return (
            f"| {label} | {seconds:.2f} | {seconds / first_s:.1%} | {cpu:.2f} | {written / 1e6:.3f} | {written / first_written:.2%} "
            f"| {uploaded[key] / 1e6:.3f} | {uploaded[key] / uploaded['first']:.2%} |"
        )

    second_s, _, second_written = runs["second"]
    checks = [
        ("second backup of the unchanged tree: <= 10% of the first's time", second_s <= 0.1 * first_s, f"{second_s / first_s:.1%}"),
        ("... <= 1% of its bytes written", second_written <= 0.01 * first_written, f"{second_written / first_written:.2%}"),
        ("... <= 1% of its bytes uploaded", uploaded["second"] <= 0.01 * uploaded["first"], f"{uploaded['second'] / uploaded['first']:.2%}"),
    ]
    lines = [
        "## Backup: the second backup of an unchanged tree (format 3, files cache)",
        "",
        f"{size / 1e6:.0f} MB of model-like data (as in the backup benchmark: 4 shards of float32 weights, config, tokenizer), "
        "backed up with the defaults (zstd 1, verification) and an off-site copy to a local S3 server (moto), three times: "
        "the first backup, the second with nothing changed, a third after one shard was rewritten. Process start included; "
        "CPU seconds are the command's own (user + system), a figure the host's load does not change much.",
        "",
        "| run | seconds | of the first | CPU seconds | MB written | of the first | MB uploaded | of the first |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        row("first backup", "first"),
        row("second, nothing changed", "second"),
        row("third, one shard rewritten", "changed"),
        "",
        *targets_table(checks),
        "",
        "Reproduce: `.venv/bin/python -m bench.run_all --only backup_incremental` (`--quick` for 100 MB).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
