"""The verification made while the archive is written (a forked process follows the file):
it reads the bytes the file holds, not what the writer meant to write, so damage on the
way to the disk fails the backup; a verifier that dies or a writer that fails leaves no
process behind and never blocks the writer."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest
from mlwarden.jobs.backup import archive, follow
from test_backup_support import SIGNAL_IN_FORK, backup, make_models, only_entry

from mlwarden.catalog import Catalog
from mlwarden.fsutil import StagedFiles


class _Damaging:
    """The archive's file, with ``damage`` applied to each write on its way to it."""

    def __init__(self, handle: BinaryIO, damage: Callable[[bytes], bytes]) -> None:
        self._handle = handle
        self._damage = damage

    def write(self, data: bytes) -> int:
        self._handle.write(self._damage(bytes(data)))
        return len(data)

    def flush(self) -> None:
        self._handle.flush()

    def fileno(self) -> int:
        return self._handle.fileno()


def _damage_writes(monkeypatch: pytest.MonkeyPatch, damage: Callable[[bytes], bytes]) -> None:
    real = archive.atomic_writer

    @contextmanager
    def damaged(path: Path, staged: StagedFiles | None = None) -> Iterator[_Damaging]:
        with real(path, staged=staged) as handle:
            yield _Damaging(handle, damage)

    monkeypatch.setattr(archive, "atomic_writer", damaged)


def _flip_first(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :] if len(data) > at else data


@pytest.mark.parametrize(
    ("compression", "expected"),
    [("none", "content does not match its SHA-256"), ("zstd", "archive is damaged"), ("gzip", "archive is damaged")],
)
def test_a_byte_flipped_on_its_way_to_the_disk_fails_the_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], compression: str, expected: str
) -> None:
    models = make_models(tmp_path / "models")
    # none: byte 515 is in the first member's content (after its 512-byte header); zstd and
    # gzip: inside the compressed data.
    _damage_writes(monkeypatch, lambda data: _flip_first(data, 515))
    assert backup(models, tmp_path / "backups", "--compression", compression) == 1
    entry = only_entry(tmp_path / "backups")  # committed, kept for inspection, marked failed
    assert entry.verified is False
    assert expected in entry.status.verification.detail  # type: ignore[union-attr]  # verified is False: there is a verification
    assert "FAILED verification" in capsys.readouterr().err


def test_an_archive_shorter_than_what_was_written_fails_the_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = make_models(tmp_path / "models")
    _damage_writes(monkeypatch, lambda data: data[:-1])  # every write loses its last byte
    assert backup(models, tmp_path / "backups", "--compression", "none") == 1
    assert only_entry(tmp_path / "backups").verified is False


def test_damage_in_a_long_archive_does_not_block_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After damage the verifier stops reading the archive but still reads the writer's
    counts before it sends what it found: with one count per member and damage at the
    1000th, what it found fills its pipe to the writer and the counts still to come fill the
    other; a verifier that answered at once would wait for a writer that waits for it."""
    models = tmp_path / "models"
    models.mkdir()
    for i in range(10_000):
        (models / f"f{i:05d}").write_bytes(b"%d" % i)
    monkeypatch.setattr(archive, "BATCH_BYTES", 512)  # each member goes to the file in a write of its own
    writes = iter(range(1_000_000))
    _damage_writes(monkeypatch, lambda data: _flip_first(data, 0) if next(writes) == 1000 else data)
    assert backup(models, tmp_path / "backups", "--compression", "none") == 1
    entry = only_entry(tmp_path / "backups")
    assert entry.verified is False
    assert "checksum does not match" in entry.status.verification.detail  # type: ignore[union-attr]  # verified is False: there is a verification


def test_a_verifier_that_dies_leaves_the_verification_to_a_read_after_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    monkeypatch.setattr(follow, "_child", lambda *args: os._exit(3))
    assert backup(models, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.verified is True
    assert "ended without a result (wait status 768): verifying the archive again" in capsys.readouterr().err


def test_damage_is_still_found_when_the_verifier_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = make_models(tmp_path / "models")
    monkeypatch.setattr(follow, "_child", lambda *args: os._exit(3))
    _damage_writes(monkeypatch, lambda data: _flip_first(data, 515))
    assert backup(models, tmp_path / "backups", "--compression", "none") == 1
    assert only_entry(tmp_path / "backups").verified is False


def test_a_writer_that_fails_leaves_no_verifier_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = make_models(tmp_path / "models")
    started: list[int] = []
    real_start = follow.Follower.start

    def start(self: follow.Follower, handle: BinaryIO) -> None:
        real_start(self, handle)
        started.append(self._pid or 0)

    def failing(real: Callable[..., object]) -> Callable[..., object]:
        def store(source_file: archive.SourceFile, *args: object) -> object:
            if source_file.relative == "shards/model-00002.safetensors":
                raise OSError(5, "Input/output error")
            return real(source_file, *args)

        return store

    monkeypatch.setattr(follow.Follower, "start", start)
    for name in ("_store_small", "_store_file"):  # whichever path the file takes: small ones have their own
        monkeypatch.setattr(archive, name, failing(getattr(archive, name)))
    assert backup(models, tmp_path / "backups") == 1
    assert Catalog(tmp_path / "backups").entries() == []
    assert len(started) == 1 and started[0] > 0
    with pytest.raises(ChildProcessError):  # reaped: not a zombie, not still running
        os.waitpid(started[0], os.WNOHANG)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_the_followed_verification_passes_a_sound_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str) -> None:
    models = make_models(tmp_path / "models", weights_bytes=3_000_000)
    monkeypatch.setattr(archive, "CHUNK_BYTES", 64 * 1024)  # a large file in many pieces
    monkeypatch.setattr(archive, "BATCH_BYTES", 16 * 1024)  # many writes: the verifier catches up with the writer often
    (models / "link").symlink_to("config.json")
    assert backup(models, tmp_path / "backups", "--compression", compression) == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.verified is True
    assert entry.status.verification.detail == "4 files and the archive hash match the manifest"  # type: ignore[union-attr]  # verified: there is a verification


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_that_lands_while_the_verifier_is_forked_stops_the_backup(
    tmp_path: Path, sig: signal.Signals, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Handled inside an at-fork handler, the signal's exception was printed and dropped and
    the backup ran to its end (exit 0); SIGTERM was ignored from then on."""
    models = make_models(tmp_path / "models")
    SIGNAL_IN_FORK.append(sig)
    try:
        assert backup(models, tmp_path / "backups") == status
    finally:
        SIGNAL_IN_FORK.clear()
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [".mlwarden-backup.lock"]  # nothing half made
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the job's handler is gone again, not left ignoring


_FOUND: list[follow.Found] = [
    ("config.json", b"0", 12, "", "ab" * 32),
    ("shards/model.bin", b"0", 0, "", "cd" * 32),
    ("dir", b"5", 0, "", None),
    ("latest", b"2", 0, "shards/model.bin", None),
]


@pytest.mark.parametrize("found", [_FOUND, _FOUND[:1], _FOUND[2:], []])
def test_what_the_verifier_found_crosses_the_pipe_as_columns_and_comes_back_whole(found: list[follow.Found]) -> None:
    columns = follow.Columns.of(found)
    assert columns is not None and columns.members() == found


def test_a_name_with_a_nul_is_sent_as_a_list_not_as_ambiguous_columns() -> None:
    assert follow.Columns.of([("a\0b", b"0", 1, "", "ab" * 32), ("c", b"0", 1, "", "ab" * 32)]) is None
    assert follow.Columns.of([("a", b"2", 0, "x\0y", None)]) is None


def test_columns_are_equal_exactly_when_what_was_found_is() -> None:
    """Each change of one field of one member (what damage in a name, a type, a size, a link or
    a content would make) makes the columns differ from the manifest's."""
    reference = follow.Columns.of(_FOUND)
    for index, member in enumerate(_FOUND):
        for position, other in enumerate(("other", b"1", 13, "elsewhere", "ef" * 32)):
            changed = list(_FOUND)
            changed[index] = (*member[:position], other, *member[position + 1 :])  # type: ignore[assignment]  # one field replaced
            assert follow.Columns.of(changed) != reference, (index, position)
    assert follow.Columns.of(list(_FOUND)) == reference


def test_a_followed_verification_names_the_file_whose_content_differs(tmp_path: Path) -> None:
    """The member-by-member check behind the columns' comparison: a changed digest fails
    naming the file, a sound archive passes."""
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    manifest = only_entry(tmp_path / "backups").stored().manifest
    expected = follow._as_written(manifest)
    assert expected is not None
    sound = follow._checked(manifest, expected, expected.members(), None, manifest.archive_sha256, manifest.archive_bytes)
    assert sound.ok
    found = expected.members()
    name, kind, size, link, _ = found[0]
    found[0] = (name, kind, size, link, "0" * 64)
    damaged = follow._checked(manifest, expected, follow.Columns.of(found) or found, None, manifest.archive_sha256, manifest.archive_bytes)
    assert not damaged.ok and damaged.detail == f"{name}: content does not match its SHA-256 in the manifest"


def test_the_verifier_ends_when_it_is_done_not_when_its_findings_are_read(tmp_path: Path) -> None:
    """What the verifier found (here well over a pipe's 64 KiB) does not keep it waiting for the
    writer, which asks for it only after the commit: it exits once the archive is verified."""
    models = tmp_path / "models"
    for i in range(3000):
        (models / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
        (models / f"d{i % 10}" / f"file-{i:05d}.bin").write_bytes(i.to_bytes(4, "big") * 25)
    with follow.Follower("zstd") as follower:
        archive.write_archive(archive.scan(models), tmp_path / "a.tar.zst", "zstd", None, follower=follower)
        pid = follower._pid
        assert pid is not None
        deadline = time.monotonic() + 120  # a bound for a stuck verifier, not a measure of speed
        while (ended := os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)) is None:
            assert time.monotonic() < deadline, "the verifier is still waiting for its findings to be read"
            time.sleep(0.01)
        assert ended.si_status == 0
