"""Format 3: content stored once across backups, the files cache, reference-safe pruning
(killed at every step), check, list and off-site copies that move only what is needed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from mlwarden.exporter.collectors.backups import BackupsCollector
from mlwarden.jobs.backup import dedup, prune
from mlwarden.jobs.backup.restore import restore_entry
from test_backup_recovery import FORMAT_2, format_2_source, recover
from test_backup_support import backup, flip_byte, hard_links, make_models, mlwarden, s3_env, tree

from mlwarden import components
from mlwarden.catalog import PACK, PRUNED, Catalog, CatalogError, FileRecord
from mlwarden.fsutil import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent
__all__ = ["s3_env"]  # a fixture: imported to be used


def settle() -> None:
    """Let the files' times fall out of the files cache's clock tick, so the cache may trust them."""
    time.sleep(dedup.CLOCK_GRANULARITY_NS / 1e9 + 0.1)


def metrics(textfile_dir: Path) -> dict[str, float]:
    lines = (textfile_dir / "mlwarden_backup.prom").read_text().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}


def run(models: Path, backups: Path, textfile_dir: Path, *extra: str) -> None:
    assert backup(models, backups, "--period", "run", "--textfile-dir", textfile_dir, *extra) == 0


def restored(entry_name: str, backups: Path, target: Path) -> dict[str, bytes]:
    restore_entry(Catalog(backups).get(entry_name), target)
    return tree(target)


def with_duplicates(models: Path) -> Path:
    make_models(models)
    (models / "copy-of-config.json").write_bytes((models / "config.json").read_bytes())
    (models / "empty-1").write_bytes(b"")
    (models / "sub").mkdir()
    (models / "sub" / "empty-2").write_bytes(b"")
    return models


def test_a_second_backup_of_an_unchanged_tree_reads_nothing_and_stores_nothing_new(tmp_path: Path) -> None:
    models, backups = with_duplicates(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)
    first_read = metrics(tmp_path)["mlwarden_backup_read_bytes"]
    run(models, backups, tmp_path)
    assert metrics(tmp_path)["mlwarden_backup_read_bytes"] == 0  # the files cache: not one byte read
    first, second = Catalog(backups).entries()
    assert first_read == first.manifest.total_bytes == second.manifest.total_bytes
    # Nothing new: no pack of its own, nothing but its index and its checksums.
    assert second.pack is None and not second.manifest.has_archive and second.manifest.archive_bytes == 0
    assert sorted(p.name for p in second.directory.iterdir()) == ["SHA256SUMS", "manifest.json", "status.json"]
    assert second.manifest.packs == (first.name,) and second.verified is True
    assert metrics(tmp_path)["mlwarden_backup_written_bytes"] == 0
    assert {r.pack for r in second.manifest.files} == {first.name}
    # Content is stored once even inside one backup: the copy and the empty files.
    assert first.pack is not None and len(first.pack.files) == len(first.manifest.files) - 2
    assert restored(second.name, backups, tmp_path / "r2") == tree(models)
    assert restored(first.name, backups, tmp_path / "r1") == tree(models)


def test_only_new_content_is_stored_and_every_backup_restores_whole(tmp_path: Path) -> None:
    models, backups = with_duplicates(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)
    before = tree(models)
    shard = models / "shards" / "model-00001.safetensors"
    shard.write_bytes(os.urandom(shard.stat().st_size))  # fine-tuned: same size, new content
    (models / "new.bin").write_bytes(os.urandom(5000))
    shutil.copy(models / "shards" / "model-00002.safetensors", models / "moved.safetensors")  # new inode, known content
    run(models, backups, tmp_path)
    first, second = Catalog(backups).entries()
    assert second.pack is not None
    assert sorted(r.path for r in second.pack.files) == ["new.bin", "shards/model-00001.safetensors"]
    assert next(r for r in second.manifest.files if r.path == "moved.safetensors").pack == first.name
    assert restored(second.name, backups, tmp_path / "r2") == tree(models)
    assert restored(first.name, backups, tmp_path / "r1") == before
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 0


def test_files_written_within_the_clock_tick_are_not_trusted_from_the_cache(tmp_path: Path) -> None:
    now = time.time_ns()
    sha = "a" * 64
    old = (1, 2, 3, now - 10**10, now - 10**10)
    recent = (1, 3, 3, now - 10**10, now - 10**6)  # its inode changed a millisecond ago
    known = dedup.Dedup("m-20260101T000000Z", {sha: "m-20251231T000000Z"}, {old: sha, recent: sha}, now)
    assert known.unchanged(old) == sha
    assert known.unchanged(recent) is None
    read_old, read_recent = (1, 4, 3, now - 10**10, now - 10**10), (1, 5, 3, now - 10**6, now - 10**10)
    for key in (read_old, read_recent):
        known.read(key, FileRecord(f"f{key[1]}", 3, sha, 0.0), stored=False)
    assert known.next_cache() == {old: sha, read_old: sha}  # trusted or read, and not written within the tick
    # A backup right after the files were written leaves no cache: the next one reads them all.
    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    run(models, backups, tmp_path)
    assert not list(backups.glob(".mlwarden-files-cache-*"))
    run(models, backups, tmp_path)
    assert metrics(tmp_path)["mlwarden_backup_read_bytes"] == Catalog(backups).entries()[-1].manifest.total_bytes


@pytest.mark.parametrize("damage", ["flip", "garbage", "version"])
def test_a_damaged_files_cache_is_dropped_with_a_log_line_and_every_file_read(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)
    (cache,) = backups.glob(".mlwarden-files-cache-*")
    if damage == "flip":
        flip_byte(cache, offset_from_end=20)
    elif damage == "garbage":
        cache.write_bytes(b"\x00\xff not json")
    else:
        header, _, body = cache.read_bytes().partition(b"\n")
        cache.write_bytes(json.dumps({**json.loads(header), "version": 99}).encode() + b"\n" + body)
    shard = models / "shards" / "model-00001.safetensors"
    stat = shard.stat()
    shard.write_bytes(os.urandom(stat.st_size))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only ctime tells
    run(models, backups, tmp_path)
    assert "dropping the files cache" in capsys.readouterr().err
    latest = Catalog(backups).entries()[-1]
    assert metrics(tmp_path)["mlwarden_backup_read_bytes"] == latest.manifest.total_bytes
    assert restored(latest.name, backups, tmp_path / "r") == tree(models)


def _chain(models: Path, backups: Path, textfile_dir: Path) -> dict[str, dict[str, bytes]]:
    """Four backups: a (A, B), b (A, B, C), c (A, C, D), d (A, D, E); each name -> its tree."""
    models.mkdir(exist_ok=True)
    (models / "A").write_bytes(os.urandom(40_000))
    (models / "B").write_bytes(os.urandom(40_000))
    snapshots = {}
    for step, (add, drop) in enumerate(((None, None), ("C", None), ("D", "B"), ("E", "C"))):
        if add:
            (models / add).write_bytes(os.urandom(40_000))
        if drop:
            (models / drop).unlink()
        run(models, backups, textfile_dir)
        snapshots[Catalog(backups).entries()[step].name] = tree(models)
    return snapshots


_KILLER = """
import os, signal, sys
from pathlib import Path
from mlwarden.catalog import Catalog
from mlwarden.jobs.backup import prune
kill_at, steps = int(sys.argv[2]), [0]
def counted(call):
    def step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(*args, **kwargs)
    return step
for name in ("rename", "replace", "unlink", "rmdir"):
    setattr(os, name, counted(getattr(os, name)))
catalog = Catalog(Path(sys.argv[1]))
prune.delete_backups(catalog, [e for e in catalog.entries() if e.name in sys.argv[3:]])
print(steps[0])
"""


def _prune_in_child(backups: Path, kill_at: int, names: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _KILLER, str(backups), str(kill_at), *names], capture_output=True, text=True, timeout=120)


def test_a_prune_killed_at_every_step_leaves_every_kept_backup_restorable(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    snapshots = _chain(tmp_path / "models", pristine, tmp_path)
    names = list(snapshots)
    kept, doomed = names[-1], names[:-1]
    full = _prune_in_child(shutil.copytree(pristine, tmp_path / "count", symlinks=True), 0, doomed)
    assert full.returncode == 0, full.stderr
    steps = int(full.stdout)
    assert steps >= 5
    for kill_at in range(1, steps + 1):
        backups = shutil.copytree(pristine, tmp_path / f"killed-{kill_at}", symlinks=True)
        child = _prune_in_child(backups, kill_at, doomed)
        assert child.returncode == -signal.SIGKILL, (kill_at, child.stderr)
        # Whatever the step, the kept backup is whole, and so is every backup not yet pruned.
        for entry in Catalog(backups).entries():
            assert restored(entry.name, backups, tmp_path / f"r-{kill_at}-{entry.name}") == snapshots[entry.name], kill_at
        assert kept in {e.name for e in Catalog(backups).entries()}
        # The next run finishes the job: staging removed, the rest pruned, the unreferenced pack gone.
        from mlwarden.jobs.backup.job import remove_stale_staging

        remove_stale_staging(backups)
        catalog = Catalog(backups)
        prune.delete_backups(catalog, [e for e in catalog.entries() if e.name in doomed])
        assert [e.name for e in catalog.entries()] == [kept]
        assert restored(kept, backups, tmp_path / f"after-{kill_at}") == snapshots[kept]
        assert sorted(p.name for p in backups.iterdir() if not p.name.startswith(".")) == sorted(catalog.entries()[0].manifest.packs)
        assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 0


def test_retention_keeps_the_packs_kept_backups_name_and_reclaims_the_rest(tmp_path: Path) -> None:
    models, backups = tmp_path / "models", tmp_path / "backups"
    models.mkdir()
    snapshots = _chain(models, backups, tmp_path)
    a, b, c, d = snapshots
    run(models, backups, tmp_path, "--keep-last", "3")  # a new backup e; a and b go
    names = [e.name for e in Catalog(backups).entries()]
    assert names[:2] == [c, d] and len(names) == 3
    # a's pack holds A, which every later backup names: it stays, as a pack; b's (C) too, named by c.
    assert (backups / a / PRUNED).exists() and (backups / a / PACK).exists() and not (backups / a / "manifest.json").exists()
    assert (backups / b / PRUNED).exists()
    archives = sum(p.stat().st_size for p in backups.rglob("*.tar.zst"))
    (size,) = [f.samples[0][1] for f in BackupsCollector(backups, 60, 60).collect().families if f.name == "mlwarden_backup_size_bytes"]
    assert size == archives  # the pruned backups' packs that kept ones need are on disk, and counted
    usage = sum(p.stat().st_size for p in backups.rglob("*") if p.is_file())
    run(models, backups, tmp_path, "--keep-last", "1")  # only the newest: c goes, and with it the last name of b's pack
    assert not (backups / b).exists() and not (backups / c / "manifest.json").exists()
    assert sum(p.stat().st_size for p in backups.rglob("*") if p.is_file()) < usage
    latest = Catalog(backups).entries()[-1]
    assert restored(latest.name, backups, tmp_path / "r") == snapshots[d] | {}  # e has d's content
    listing = json.loads(_capture(["backup-list", "--backup-dir", str(backups), "--json"]))
    assert [row["name"] for row in listing if row["kind"] == "backup"] == [latest.name]
    assert {row["name"] for row in listing if row["kind"] == "pack"} == set(latest.manifest.packs) - {latest.name}


def _capture(argv: list[str]) -> str:
    done = subprocess.run([str(REPO / ".venv" / "bin" / "mlwarden"), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def two_backups(models: Path, backups: Path, textfile_dir: Path) -> None:
    """A backup of ``models``, then one after a 3,000-byte file was added."""
    settle()
    run(models, backups, textfile_dir)
    (models / "new.bin").write_bytes(os.urandom(3000))
    run(models, backups, textfile_dir)


def test_check_resolves_every_pack_reference_and_read_data_reads_every_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backups = tmp_path / "backups"
    two_backups(with_duplicates(tmp_path / "models"), backups, tmp_path)
    first, second = Catalog(backups).entries()
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 0
    flip_byte(first.archive_path)  # in the older pack, which the newest backup needs
    assert mlwarden("backup-check", "--backup-dir", backups) == 0  # sizes and recorded hashes still agree
    capsys.readouterr()
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 1
    assert f"check FAILED: {first.name}" in capsys.readouterr().err
    shutil.rmtree(backups / first.name)
    assert mlwarden("backup-check", "--backup-dir", backups) == 1
    assert f"check FAILED: {second.name}: pack {first.name}" in capsys.readouterr().err


def test_list_shows_new_bytes_next_to_total_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_backups(make_models(tmp_path / "models"), tmp_path / "backups", tmp_path)
    backups = tmp_path / "backups"
    capsys.readouterr()
    assert mlwarden("backup-list", "--backup-dir", backups, "--json") == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first["new_bytes"] == first["total_bytes"] and second["new_bytes"] == 3000
    assert second["total_bytes"] == first["total_bytes"] + 3000
    assert mlwarden("backup-list", "--backup-dir", backups) == 0
    assert "NEW" in capsys.readouterr().out.splitlines()[0]


def test_format_2_and_format_3_backups_mix_restore_and_prune(tmp_path: Path) -> None:
    models, backups = format_2_source(tmp_path / "models"), tmp_path / "backups"
    shutil.copytree(FORMAT_2, backups)
    (old,) = Catalog(backups).entries()
    manifest = json.loads((old.directory / "manifest.json").read_text())
    manifest["source"] = str(models.absolute())  # made from this directory: retention treats them as one series
    (old.directory / "manifest.json").write_text(json.dumps(manifest))
    run(models, backups, tmp_path)
    old_entry, new = Catalog(backups).entries()
    assert old_entry.pack is None and new.pack is not None and old.name not in new.manifest.packs
    assert restored(old.name, backups, tmp_path / "r-old") == restored(new.name, backups, tmp_path / "r-new") == tree(models)
    run(models, backups, tmp_path, "--keep-last", "1")
    assert old.name not in {p.name for p in backups.iterdir()}
    assert (backups / new.name / PRUNED).exists()  # pruned, but its pack holds the newest backup's content
    latest = Catalog(backups).entries()[-1]
    assert restored(latest.name, backups, tmp_path / "r") == tree(models)


def test_the_recovery_script_rebuilds_a_format_3_backup_from_its_packs(tmp_path: Path) -> None:
    models, backups = with_duplicates(tmp_path / "models"), tmp_path / "backups"
    (models / "alias.json").symlink_to("config.json")
    two_backups(models, backups, tmp_path)
    latest = Catalog(backups).entries()[-1]
    done = recover(latest.directory, tmp_path / "recovered")
    assert done.returncode == 0, done.stderr
    assert tree(tmp_path / "recovered") == tree(models)
    assert os.readlink(tmp_path / "recovered" / "alias.json") == "config.json"
    flip_byte(Catalog(backups).entries()[0].archive_path)  # the older pack, which holds most of it
    done = recover(latest.directory, tmp_path / "damaged")
    assert done.returncode == 1 and "damaged" in done.stderr


def test_offsite_moves_only_the_packs_needed_and_prunes_the_bucket_by_reference(
    tmp_path: Path, s3_env: list[str], s3_server: components.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlwarden.jobs.backup.offsite import OffsiteStore

    uploaded: list[str] = []
    downloaded: list[str] = []
    copy, fetch = OffsiteStore._copy, OffsiteStore._fetch_archive
    monkeypatch.setattr(OffsiteStore, "_copy", lambda self, entry, names: uploaded.append(entry.name) or copy(self, entry, names))
    monkeypatch.setattr(OffsiteStore, "_fetch_archive", lambda self, name, *rest: downloaded.append(name) or fetch(self, name, *rest))
    models, backups = tmp_path / "models", tmp_path / "backups"
    models.mkdir()
    (models / "A").write_bytes(os.urandom(50_000))
    (models / "B").write_bytes(os.urandom(50_000))
    run(models, backups, tmp_path, *s3_env)
    (models / "C").write_bytes(os.urandom(50_000))
    uploaded.clear()
    run(models, backups, tmp_path, *s3_env)
    first, second = (e.name for e in Catalog(backups).entries())
    assert uploaded == [second]  # only the new pack goes up: A and B are in the bucket already
    (models / "B").unlink()
    (models / "C").unlink()
    (models / "D").write_bytes(os.urandom(50_000))
    run(models, backups, tmp_path, *s3_env)
    third = Catalog(backups).entries()[-1].name
    expected = tree(models)
    assert mlwarden("restore", third, "--from-s3", *s3_env, "--to", tmp_path / "r3") == 0
    assert tree(tmp_path / "r3") == expected
    assert sorted(downloaded) == sorted([first, third])  # the second pack is in the bucket, but nothing of it is needed
    downloaded.clear()
    run(models, backups, tmp_path, *s3_env, "--keep-last", "1", "--s3-retention")  # nothing changed: names first and third
    fourth = Catalog(backups).entries()[-1].name
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    bucket = s3_env[s3_env.index("--s3-bucket") + 1]
    groups: dict[str, set[str]] = {}
    for obj in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        name, file_name = obj["Key"].split("/")[2:]
        groups.setdefault(name, set()).add(file_name)
    assert {name for name, files in groups.items() if "manifest.json" in files} == {fourth}
    assert second not in groups  # its pack (C) was named by no kept manifest: deleted
    assert "pack.json" in groups[first] and "pack.json" in groups[third]  # A and D live there
    assert groups[fourth] == {"manifest.json", "SHA256SUMS"}  # it stored nothing new: no pack of its own
    shutil.rmtree(backups)  # the machine lost its disk
    downloaded.clear()
    assert mlwarden("restore", "latest", "--from-s3", *s3_env, "--to", tmp_path / "r") == 0
    assert tree(tmp_path / "r") == expected
    assert sorted(downloaded) == sorted([first, third])


def test_hard_links_are_read_and_stored_once(tmp_path: Path) -> None:
    models, backups = tmp_path / "models", tmp_path / "backups"
    models.mkdir()
    (models / "weights.bin").write_bytes(os.urandom(9 * 2**20))  # more than one read chunk: streamed, not hashed first
    os.link(models / "weights.bin", models / "same-weights.bin")
    run(models, backups, tmp_path)
    (entry,) = Catalog(backups).entries()
    assert entry.pack is not None and [r.path for r in entry.pack.files] == ["same-weights.bin"]
    assert metrics(tmp_path)["mlwarden_backup_read_bytes"] == 9 * 2**20
    assert restored(entry.name, backups, tmp_path / "r") == tree(models)
    assert hard_links(tmp_path / "r") == {frozenset({"weights.bin", "same-weights.bin"})}


def linked_tree(models: Path) -> Path:
    """Hard links in one directory and across directories, three names for one file, and a
    copy with the same content that is no link (it must come back as a file of its own)."""
    (models / "a" / "b").mkdir(parents=True)
    (models / "a" / "config.json").write_bytes(b'{"hidden_size": 64}')
    os.link(models / "a" / "config.json", models / "a" / "b" / "config-link.json")
    os.link(models / "a" / "config.json", models / "config-too.json")
    (models / "copy.json").write_bytes(b'{"hidden_size": 64}')
    (models / "weights.bin").write_bytes(os.urandom(100_000))
    os.link(models / "weights.bin", models / "a" / "weights-link.bin")
    (models / "empty").write_bytes(b"")
    os.link(models / "empty", models / "empty-link")
    os.chmod(models / "weights.bin", 0o640)
    return models


def test_hard_links_come_back_as_hard_links_link_for_link_also_from_an_unread_second_backup(tmp_path: Path) -> None:
    models, backups = linked_tree(tmp_path / "models"), tmp_path / "backups"
    expected = {
        frozenset({"a/config.json", "a/b/config-link.json", "config-too.json"}),
        frozenset({"weights.bin", "a/weights-link.bin"}),
        frozenset({"empty", "empty-link"}),
    }
    assert hard_links(models) == expected
    settle()  # a linked file's ctime changes with each link: the cache takes them once the tick has passed
    run(models, backups, tmp_path)
    first = Catalog(backups).entries()[0]
    # Each joined to the first name of its file in path order: the one the archive holds.
    assert {(h.path, h.target) for h in first.manifest.hardlinks} == {
        ("a/config.json", "a/b/config-link.json"),
        ("config-too.json", "a/b/config-link.json"),
        ("weights.bin", "a/weights-link.bin"),
        ("empty-link", "empty"),
    }
    run(models, backups, tmp_path)  # nothing read: the records come from the files cache
    assert metrics(tmp_path)["mlwarden_backup_read_bytes"] == 0
    for entry in Catalog(backups).entries():
        target = tmp_path / f"r-{entry.name}"
        assert restored(entry.name, backups, target) == tree(models)
        assert hard_links(target) == expected
        assert os.stat(target / "copy.json").st_nlink == 1  # same content, not a link: its own file
        assert (os.stat(target / "a" / "weights-link.bin").st_mode & 0o777) == 0o640 & ~_umask()
        assert mlwarden("restore", entry.name, "--backup-dir", backups, "--drill") == 0
        recovered = recover(entry.directory, tmp_path / f"recovered-{entry.name}")
        assert recovered.returncode == 0, recovered.stderr
        assert tree(tmp_path / f"recovered-{entry.name}") == tree(models) and hard_links(tmp_path / f"recovered-{entry.name}") == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("path", "target", "why"),
    [
        ("copy.json", "weights.bin", "other content"),
        ("copy.json", "not-in-the-backup.json", "no such file"),
        ("../outside.json", "weights.bin", "not a file of the manifest"),
    ],
)
def test_a_hard_link_that_does_not_join_two_files_of_the_same_content_is_refused(tmp_path: Path, path: str, target: str, why: str) -> None:
    models, backups = linked_tree(tmp_path / "models"), tmp_path / "backups"
    run(models, backups, tmp_path)
    (entry,) = Catalog(backups).entries()
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    manifest["hardlinks"].append({"path": path, "target": target})
    (entry.directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CatalogError, match="does not join two files of the same content"):
        Catalog(backups).get(entry.name)
    assert mlwarden("restore", entry.name, "--backup-dir", backups, "--to", tmp_path / "r") == 1
    assert not (tmp_path / "r").exists(), why


def test_a_known_file_that_changes_while_it_is_hashed_is_read_again_and_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_backup_consistency import SIZE, _models, _writer

    models, backups = _models(tmp_path), tmp_path / "backups"
    run(models, backups, tmp_path)  # its content is in a pack now: the next run hashes it before storing
    _writer(monkeypatch, models / "checkpoint.pt", times=1)
    run(models, backups, tmp_path)
    latest = Catalog(backups).entries()[-1]
    # Nothing torn went into the archive (the first read only hashed), so nothing is "rewritten".
    assert latest.manifest.rewritten == ()
    assert latest.pack is not None and [r.path for r in latest.pack.files] == ["checkpoint.pt"]
    assert latest.verified is True
    assert restored(latest.name, backups, tmp_path / "r") == {"checkpoint.pt": b"\x41" * SIZE}


@pytest.mark.parametrize("hostile", ["../../etc", "/etc", "models-20260101T000000Z/../../x"])
def test_a_pack_name_that_is_not_a_backup_name_is_refused_before_anything_is_read(
    tmp_path: Path, hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    run(models, backups, tmp_path)
    (entry,) = Catalog(backups).entries()
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    manifest["files"][0]["pack"] = hostile
    (entry.directory / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert mlwarden("restore", entry.name, "--backup-dir", backups, "--to", tmp_path / "r") == 1
    assert "not a backup name" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_files_cache_is_written_as_json_dumps_writes_it_and_read_back(tmp_path: Path) -> None:
    """save_cache formats its entries by hand: byte for byte what json.dumps writes, so a
    cache written before reads the same and any JSON reader reads it."""
    entries = {(2**63 - 1, 0, 5, 1_700_000_000_123_456_789, 1), (64769, 12, 0, 0, 1_700_000_000_000_000_000)}
    cache = {key: f"{n:064x}" for n, key in enumerate(sorted(entries))}
    dedup.save_cache(tmp_path / "cache.json", cache)
    header, _, body = (tmp_path / "cache.json").read_bytes().partition(b"\n")
    assert body == json.dumps([[*key, sha] for key, sha in sorted(cache.items())], separators=(",", ":")).encode()
    assert json.loads(header)["version"] == dedup.CACHE_VERSION
    assert dedup.load_cache(tmp_path / "cache.json") == cache
    dedup.save_cache(tmp_path / "empty.json", {})
    assert dedup.load_cache(tmp_path / "empty.json") == {}


def test_the_files_cache_is_written_whole_but_not_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache checks itself and is only a hint: it is renamed into place whole, without the
    two fsyncs that made it the last thing a backup waited for; other atomic writes keep them."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    cache = {(1, 2, 3, 4, 5): "ab" * 32}
    dedup.save_cache(tmp_path / "cache.json", cache)
    assert synced == [] and dedup.load_cache(tmp_path / "cache.json") == cache
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left
    atomic_write_bytes(tmp_path / "other", b"x")
    assert len(synced) == 2  # the file, then its directory
