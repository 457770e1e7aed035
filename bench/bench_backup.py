"""``mlwarden backup`` against the shell pipelines, side by side on the same generated model.

The data looks like a checkpoint: float32 weights drawn from a normal distribution (what
trained weights look like to a compressor: the sign and exponent bytes compress a little,
the mantissa bytes not at all), in shards, plus JSON configs. Every contender archives the
same directory with a warm page cache, in the same run:

- the shell way: ``tar -czf`` then ``sha256sum`` of the archive;
- the best CLI: ``tar -cf - | zstd -3 -T0`` then ``sha256sum``;
- ``mlwarden backup --no-verify`` with defaults (zstd 1, all cores), with zstd 3 (the CLI's
  level) and with gzip level 6,
  run as the real command (process start included). It also hashes every file, writes
  SHA256SUMS and the manifest, and fsyncs; the shell pipelines do none of that.

Verification (``mlwarden``'s archive hash plus every member against the manifest) is timed
against one plain read of the archive: ``sha256sum`` (the shell's verify) and ``cat``.

A Hugging Face hub cache of three revisions (``snapshots/<rev>/<file>`` links into
``blobs/``): its archive against the bytes of its blobs, and its links restored as links.

Two more shapes, each against ``tar -cf - | zstd -1 -T0`` (+ ``sha256sum``) and
``zstd -dc | tar -x`` (+ ``sha256sum -c`` of every file for the weights), run interleaved:
20,000 files of 1-4 KB (``mlwarden backup`` with its verification, ``mlwarden restore``; best
of 5 rounds, with the range), and the weights' restore (best of 2). Each run writes into a
directory of its own, removed after the last round (see :func:`side_by_side`).

    python -m bench.run_all --only backup [--quick]
"""

from __future__ import annotations

import array
import functools
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlwarden.jobs.backup.verify import verify_archive

from bench import targets_table
from mlwarden.catalog import Catalog

ROOT = Path(__file__).resolve().parent.parent
BASE_FLOATS = 2**22  # 16 MiB of N(0, 0.02) float32, re-used with fresh random mantissas


def weights(size: int, rng: random.Random) -> bytes:
    """``size`` bytes of float32 weights ~ N(0, 0.02).

    Drawing every float with ``random.gauss`` would take minutes, so a 16 MiB base block is
    drawn once and each further block XORs fresh random bits into the two low mantissa
    bytes: same distribution, no repeated content within any compressor's window.
    """
    base = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(BASE_FLOATS))).tobytes()
    base_int = int.from_bytes(base, "little")
    out = bytearray()
    while len(out) < size:
        mask = bytearray(rng.randbytes(len(base)))
        mask[2::4] = bytes(len(base) // 4)
        mask[3::4] = bytes(len(base) // 4)
        out += (base_int ^ int.from_bytes(mask, "little")).to_bytes(len(base), "little")
    return bytes(out[:size])


def generate(directory: Path, total: int) -> int:
    rng = random.Random(42)
    shards = 4
    (directory / "checkpoint").mkdir(parents=True)
    data = weights(total, rng)
    step = total // shards
    for i in range(shards):
        (directory / "checkpoint" / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").write_bytes(data[i * step : (i + 1) * step])
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32}\n')
    (directory / "tokenizer.json").write_text('{"model": {"vocab": {' + ", ".join(f'"tok{i}": {i}' for i in range(50_000)) + "}}}\n")
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def timed(action: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def shell(command: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, stdout=subprocess.DEVNULL)


def backup_command(source: Path, backups: Path, *extra: str) -> None:
    """``mlwarden backup`` into an emptied ``backups``: the command alone, as timed against tar."""
    shutil.rmtree(backups, ignore_errors=True)
    argv = [sys.executable, "-m", "mlwarden.cli", "backup", "--model-dir", str(source), "--backup-dir", str(backups),
            "--no-verify", "--log-level", "warning", *extra]
    subprocess.run(argv, cwd=ROOT, check=True)


def mlwarden_backup(source: Path, backups: Path, *extra: str) -> Path:
    """:func:`backup_command`, then the archive it wrote (found by reading the catalog here)."""
    backup_command(source, backups, *extra)
    entry = Catalog(backups).latest()
    assert entry is not None
    return entry.archive_path


def small_files(directory: Path, count: int) -> int:
    """``count`` files of 1-4 KB in 40 directories: configs, tokenizer pieces, small shards."""
    rng = random.Random(7)
    total = 0
    for i in range(count):
        sub = directory / f"part{i % 40:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(512, 2048)) * 2  # half compressible, as text is
        (sub / f"piece-{i:05d}.json").write_bytes(data)
        total += len(data)
    return total


def hf_cache(directory: Path, model_bytes: int) -> tuple[Path, int]:
    """A Hugging Face hub cache: content in blobs/, each of three revisions' snapshots links to
    it (9 links): a new model file of ``model_bytes`` per revision, a tokenizer changed once, a
    config shared by all. Returns the cache and the bytes of its blobs."""
    repo = directory / "models--acme--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev3")
    rng = random.Random(11)
    config, tokenizers = rng.randbytes(2_000), [rng.randbytes(model_bytes // 20) for _ in range(2)]
    blob_bytes = 0
    for n, revision in enumerate(("rev1", "rev2", "rev3")):
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        files = {"model.safetensors": rng.randbytes(model_bytes), "tokenizer.json": tokenizers[n > 0], "config.json": config}
        for name, content in files.items():
            sha = hashlib.sha256(content).hexdigest()
            blob = repo / "blobs" / sha
            if not blob.exists():
                blob.write_bytes(content)
                blob_bytes += len(content)
            (snapshot / name).symlink_to(f"../../blobs/{sha}")
    return directory, blob_bytes


def links(directory: Path) -> dict[str, str]:
    """Every symlink under ``directory`` (relative path -> target), none followed."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                found[path.relative_to(directory).as_posix()] = os.readlink(path)
    return found


def hugging_face(work: Path, model_bytes: int) -> tuple[list[str], list[tuple[str, bool, str]]]:
    """A three-revision hub cache backed up and restored: archive bytes against blob bytes, links kept."""
    cache, blob_bytes = hf_cache(work / "hub", model_bytes)
    backup_command(cache, work / "b-hub")
    entry = Catalog(work / "b-hub").latest()
    assert entry is not None
    mlwarden_restore(work / "b-hub", work / "r-hub")
    expected, restored = links(cache), links(work / "r-hub")
    kept = sum(restored.get(path) == target for path, target in expected.items())
    ratio = entry.manifest.archive_bytes / blob_bytes
    lines = [
        f"Hugging Face hub cache, 3 revisions, {len(expected)} links into `blobs/` ({blob_bytes / 1e6:.1f} MB of blobs): "
        f"archive {entry.manifest.archive_bytes / 1e6:.1f} MB ({ratio:.3f}x the blobs), {kept} of {len(expected)} links "
        "restored as the same links.",
    ]
    checks = [
        ("Hugging Face cache: archive within 1.05x of its blobs", ratio <= 1.05, f"{ratio:.3f}x"),
        ("Hugging Face cache: every symlink restored as a symlink", kept == len(expected) > 0, f"{kept} of {len(expected)}"),
    ]
    return lines, checks


def mlwarden_restore(backups: Path, target: Path) -> None:
    argv = [sys.executable, "-m", "mlwarden.cli", "restore", "--backup-dir", str(backups), "--to", str(target), "--log-level", "warning"]
    subprocess.run(argv, cwd=ROOT, check=True)


def side_by_side(work: Path, actions: dict[str, tuple[Callable[[Path], object], bool]], rounds: int) -> dict[str, list[float]]:
    """Each action's times over ``rounds`` rounds, the contenders taking turns so that noise
    hits them alike. Each run writes into a directory of its own (made first when the action
    needs it to exist), and everything written so far is flushed to disk (``sync``) before
    it, outside the timing. Without the flush, an action that syncs its own writes
    (mlwarden's fsyncs and syncfs) also paid for writing out what the action before it left
    dirty (tar's 20,000 files): measured 2026-11-30 without it, two runs minutes apart gave
    the small-file backup 2.79x and 3.38x, the untar baseline 2.38 s and 7.92 s. The
    directories are removed only after the last round: on an ext4 without a journal (this
    VM's) a file created within a minute or more of many deletions makes the kernel step
    over each recently freed inode (``recently_deleted`` in ``find_inode_bit``, 30% of
    untar's samples under ``perf``), so a run after the previous run's tree was deleted paid
    for that deletion, and more so the later in a round it came."""
    times: dict[str, list[float]] = {label: [] for label in actions}
    outputs: list[Path] = []
    try:
        for round_ in range(rounds):
            for label, (action, make_dir) in actions.items():
                output = work / f"{label}-{round_}"
                outputs.append(output)
                if make_dir:
                    output.mkdir()  # tar -C needs it; mlwarden makes its own
                os.sync()
                times[label].append(timed(functools.partial(action, output)))
    finally:
        for output in outputs:
            shutil.rmtree(output, ignore_errors=True)
    return times


def _spread(times: list[float]) -> str:
    """Best, and the range of all rounds."""
    return f"{min(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def shapes(work: Path, weights_dir: Path, weights_backups: Path, count: int, rounds: int) -> tuple[list[str], list[tuple[str, bool, str]]]:
    """Small files (backup with verify, restore) and the weights' restore, against tar and zstd."""
    source = work / "small"
    small_bytes = small_files(source, count)
    archive = work / "small.tar.zst"
    backups = work / "b-small"
    backup_command(source, backups)  # what every timed restore reads (each timed backup writes a directory of its own)
    small = side_by_side(
        work,
        {
            "tar": (lambda _: shell(f"tar -cf - -C {source} . | zstd -1 -T0 -q -f -o {archive} && sha256sum {archive}"), False),
            # The command alone: reading its 20,000-file manifest back here, to find an archive
            # this row does not use, took 0.36 s of the bench's own time (charged to mlwarden until 2026-11-30).
            "mlwarden": (lambda output: backup_command(source, output, "--verify"), False),
            "untar": (lambda output: shell(f"zstd -dc {archive} | tar -xf - -C {output}"), True),
            "restore": (lambda output: mlwarden_restore(backups, output), False),
        },
        rounds,
    )
    entry = Catalog(weights_backups).latest()
    assert entry is not None
    sums = entry.directory / "SHA256SUMS"
    big = side_by_side(
        work,
        {
            "untar": (lambda output: shell(f"zstd -dc {entry.archive_path} | tar -xf - -C {output} && cd {output} && sha256sum -c --quiet {sums}"),
                      True),
            "restore": (lambda output: mlwarden_restore(weights_backups, output), False),
        },
        min(rounds, 2),  # 500 MB a run, and far from its target
    )
    best = {f"small-{label}": min(times) for label, times in small.items()} | {f"big-{label}": min(times) for label, times in big.items()}
    backup_ratio, restore_ratio = best["small-mlwarden"] / best["small-tar"], best["small-restore"] / best["small-untar"]
    big_ratio = best["big-restore"] / best["big-untar"]
    lines = [
        f"{count:,} files of 1-4 KB ({small_bytes / 1e6:.0f} MB; best of {rounds} rounds, the range of all rounds in brackets), and the "
        f"weights above (best of {min(rounds, 2)}); contenders taking turns, each starting with nothing left to write back (`sync` "
        "before it, untimed) and writing into a directory of its own (all removed after the last round, untimed).",
        "",
        "| shape | baseline | seconds | `mlwarden` | seconds | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {count:,} small files: backup | `tar -cf - \\| zstd -1 -T0` + `sha256sum` | {_spread(small['tar'])} "
        f"| `backup` (with its verification) | {_spread(small['mlwarden'])} | {backup_ratio:.2f}x |",
        f"| {count:,} small files: restore | `zstd -dc \\| tar -x` | {_spread(small['untar'])} "
        f"| `restore` (every file hashed, one syncfs) | {_spread(small['restore'])} | {restore_ratio:.2f}x |",
        f"| weights: restore | `zstd -dc \\| tar -x` + `sha256sum -c` | {_spread(big['untar'])} "
        f"| `restore` | {_spread(big['restore'])} | {big_ratio:.2f}x |",
    ]
    checks = [
        ("small files: backup with verify within 3x of `tar \\| zstd -1 -T0` + `sha256sum`", backup_ratio <= 3, f"{backup_ratio:.2f}x"),
        ("small files: restore within 3x of `zstd -dc \\| tar -x`", restore_ratio <= 3, f"{restore_ratio:.2f}x"),
        ("weights: restore within 1.3x of `zstd -dc \\| tar -x` + `sha256sum -c`", big_ratio <= 1.3, f"{big_ratio:.2f}x"),
    ]
    return lines, checks


def run(quick: bool) -> str:
    total = (100 if quick else 500) * 10**6
    repeat = 1 if quick else 2
    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    try:
        source = work / "model"
        size = generate(source, total)
        out = work / "out"
        out.mkdir()
        gz, zst, zst1 = out / "shell.tar.gz", out / "cli.tar.zst", out / "cli1.tar.zst"
        t_shell = timed(lambda: shell(f"tar -czf {gz} -C {source} . && sha256sum {gz}"))
        t_cli = timed(lambda: shell(f"tar -cf - -C {source} . | zstd -3 -T0 -q -f -o {zst} && sha256sum {zst}"), repeat)
        t_cli1 = timed(lambda: shell(f"tar -cf - -C {source} . | zstd -1 -T0 -q -f -o {zst1} && sha256sum {zst1}"), repeat)
        t_default = timed(lambda: mlwarden_backup(source, work / "b-default"), repeat)
        t_level3 = timed(lambda: mlwarden_backup(source, work / "b-level3", "--level", "3"), repeat)
        level3_entry = Catalog(work / "b-level3").latest()
        assert level3_entry is not None
        t_gzip = timed(lambda: mlwarden_backup(source, work / "b-gzip", "--compression", "gzip", "--level", "6"))
        entry = Catalog(work / "b-default").latest()
        assert entry is not None
        t_verify = timed(lambda: verify_archive(entry).ok or sys.exit("verify failed"), repeat)
        t_sha = timed(lambda: shell(f"sha256sum {entry.archive_path}"), repeat)
        t_cat = timed(lambda: shell(f"cat {entry.archive_path} > /dev/null"), repeat)
        shape_lines, shape_checks = shapes(work, source, work / "b-default", 5_000 if quick else 20_000, 2 if quick else 5)
        hub_lines, hub_checks = hugging_face(work, (2 if quick else 10) * 10**6)
        gzip_entry = Catalog(work / "b-gzip").latest()
        assert gzip_entry is not None
        ratios = {
            "shell": size / gz.stat().st_size,
            "cli": size / zst.stat().st_size,
            "cli1": size / zst1.stat().st_size,
            "default": size / entry.manifest.archive_bytes,
            "gzip": size / gzip_entry.manifest.archive_bytes,
            "level3": size / level3_entry.manifest.archive_bytes,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6

    def row(label: str, seconds: float, ratio: float, note: str) -> str:
        return f"| {label} | {seconds:.2f} | {mb / seconds:.0f} | {ratio:.3f} | {note} |"

    speedup = t_shell / t_default
    vs_cli = t_default / t_cli
    verify_vs_read = t_verify / t_sha
    checks = [
        ("default at least 10x faster than `tar -czf` + `sha256sum`", speedup >= 10, f"{speedup:.1f}x"),
        ("compression ratio equal or better than the shell's", ratios["default"] >= ratios["shell"] - 1e-9,
         f"{ratios['default']:.3f} vs {ratios['shell']:.3f}"),
        ("within 1.3x of `tar \\| zstd -3 -T0` + `sha256sum`", vs_cli <= 1.3, f"{vs_cli:.2f}x (at level 3: {t_level3 / t_cli:.2f}x)"),
        ("verify within 1.5x of one read (`sha256sum`)", verify_vs_read <= 1.5, f"{verify_vs_read:.2f}x"),
        ("within 1.3x of `tar \\| zstd -1 -T0` + `sha256sum` (the same level)", t_default / t_cli1 <= 1.3, f"{t_default / t_cli1:.2f}x"),
        *shape_checks,
        *hub_checks,
    ]
    lines = [
        "## Backup: `mlwarden backup` vs `tar -czf` + `sha256sum` and `tar | zstd -T0`",
        "",
        f"{mb:.0f} MB of model-like data (float32 weights ~ N(0, 0.02) in 4 shards, JSON config and tokenizer), "
        f"warm page cache, {os.cpu_count()} cores shared with other work; best of {repeat} where noted.",
        "",
        "| archive | seconds | MB/s | compression ratio | notes |",
        "| --- | --- | --- | --- | --- |",
        row("shell: `tar -czf` + `sha256sum`", t_shell, ratios["shell"], "baseline; no per-file hashes, no fsync"),
        row("best CLI: `tar -cf - \\| zstd -3 -T0` + `sha256sum`", t_cli, ratios["cli"], f"best of {repeat}; no per-file hashes, no fsync"),
        row("`tar -cf - \\| zstd -1 -T0` + `sha256sum`", t_cli1, ratios["cli1"], f"best of {repeat}; the level of mlwarden's default"),
        row("`mlwarden backup` (defaults: zstd 1, all cores)", t_default, ratios["default"],
            f"best of {repeat}; per-file SHA-256, SHA256SUMS, manifest, fsync; process start included"),
        row("`mlwarden backup --level 3`", t_level3, ratios["level3"], f"best of {repeat}; the CLI's level, for a like-for-like comparison"),
        row("`mlwarden backup --compression gzip --level 6`", t_gzip, ratios["gzip"], "for compatibility; as slow as gzip is"),
        "",
        "| verification | seconds | MB/s of archive | notes |",
        "| --- | --- | --- | --- |",
        f"| `sha256sum` of the archive (one read) | {t_sha:.2f} | {entry.manifest.archive_bytes / 1e6 / t_sha:.0f} | baseline |",
        f"| `cat` of the archive (one read) | {t_cat:.2f} | {entry.manifest.archive_bytes / 1e6 / t_cat:.0f} | |",
        f"| `mlwarden` verify | {t_verify:.2f} | {entry.manifest.archive_bytes / 1e6 / t_verify:.0f} "
        "| archive hash + decompress + every member's hash |",
        "",
        *shape_lines,
        "",
        *hub_lines,
        "",
        *targets_table(checks),
        "",
        "Reproduce: `.venv/bin/python -m bench.run_all --only backup` (`--quick` for 100 MB and 5,000 small files).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
