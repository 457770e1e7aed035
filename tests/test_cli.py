"""The ``mlwarden`` command line: help that tells what users need, and one-line usage errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from mlwarden import cli

MLWARDEN = str(Path(sys.executable).with_name("mlwarden"))


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_shows_choices_defaults_and_required_options(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of("backup", capsys)
    assert "--compression {zstd,gzip,none}" in text and "COMPRESSION " not in text
    flat = " ".join(text.split())
    assert "is far slower (default: zstd) [env MLWARDEN_BACKUP_COMPRESSION]" in flat
    assert "[env MLWARDEN_BACKUP_LEVEL or COMPRESSION_LEVEL]" in flat
    required = text.split("required (as a flag or in the environment):")[1].split("backup options:")[0]
    assert "--model-dir" in required and "--backup-dir" in required and "--compression" not in required
    assert "--log-format {text,logfmt,json}" in text


def test_help_names_the_environment_variables_that_hold_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of("relay", capsys)
    secrets = text.split("secrets (")[1]
    assert "MLWARDEN_RELAY_TOKEN or MLWARDEN_RELAY_TOKEN_FILE: bearer token" in secrets
    assert "MLWARDEN_RELAY_BASIC_AUTH_PASSWORD_FILE" in secrets
    assert "--token" not in text  # secrets are never flags
    assert "secrets (" not in help_of("cleanup", capsys)  # no empty section where there are none


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["bakup"], "mlwarden: unknown command 'bakup' (did you mean backup?); commands: exporter, relay,"),
        (["backup", "--compresion", "zstd"], "mlwarden backup: unrecognized arguments: --compresion zstd (did you mean --compression?)"),
        (["cleanup", "--dry-rn"], "mlwarden cleanup: unrecognized arguments: --dry-rn (did you mean --dry-run?)"),
        (["backup", "--log-formt=json"], "(did you mean --log-format?)"),
        (["backup", "--compression", "zst"], "mlwarden backup: argument --compression: invalid choice: 'zst'"),
        (["backup", "--compression"], "mlwarden backup: argument --compression: expected one argument"),
        ([], "mlwarden: a command is required: exporter, relay, backup,"),
        (["health", "extra"], "mlwarden health: unrecognized arguments: extra"),
    ],
)
def test_every_usage_error_is_one_line_and_exit_2(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and line in captured.err, captured.err
    assert "usage:" not in captured.err


def test_a_near_miss_value_in_the_environment_gets_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLWARDEN_BACKUP_COMPRESSION", "zstf")
    assert cli.main(["backup", "--model-dir", str(tmp_path), "--backup-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err == "mlwarden backup: invalid MLWARDEN_BACKUP_COMPRESSION='zstf': expected one of zstd, gzip, none (did you mean zstd?)\n"


def test_the_installed_command_prints_one_line_for_a_mistyped_command() -> None:
    result = subprocess.run([MLWARDEN, "relya"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("mlwarden: unknown command 'relya' (did you mean relay?)")
    assert result.stderr.count("\n") == 1


def test_the_process_entry_lets_a_command_freeze_what_it_keeps_to_its_end(tmp_path: Path) -> None:
    """``mlwarden`` (the console script, ``python -m mlwarden.cli``) marks its process as the
    command's own: what a command keeps to its end is frozen there, never in a caller's process."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mlwarden"]
    assert script.value == "mlwarden.cli:entry"
    # entry() ends the process itself (after the atexit handlers): the check runs as one of them.
    done = _entry_after(
        "import atexit, gc; from mlwarden import gcpause\n"
        "def check():\n"
        "    before = gc.get_freeze_count()\n"
        "    with gcpause.kept_until_exit(): kept = [{'i': i} for i in range(1000)]\n"
        "    print(gc.get_freeze_count() - before >= 1000)\n"
        "atexit.register(check)\n",
        tmp_path,
    )
    assert done.stdout.split()[-1:] == ["True"], done.stderr  # after backup-list's (empty) table; "returned" never printed


def _entry_after(setup: str, backup_dir: Path) -> subprocess.CompletedProcess[str]:
    """``mlwarden backup-list`` by cli.entry() in a process of its own, after ``setup``; its
    exit status 0 checked. entry() ends the process: what would follow never runs."""
    code = (
        f"import sys; from mlwarden import cli\n{setup}sys.argv = ['mlwarden', 'backup-list', '--backup-dir', {str(backup_dir)!r}]\n"
        "code = cli.entry(); print('returned'); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _backup_process(models: Path, backups: Path, log_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MLWARDEN, "backup", "--model-dir", str(models), "--backup-dir", str(backups), "--log-file", str(log_file), "--log-level", "debug"],
        capture_output=True, text=True, timeout=120,
    )


def test_the_process_ends_without_teardown_with_its_output_log_and_exit_status_whole(tmp_path: Path) -> None:
    """The ``mlwarden`` process skips the interpreter's teardown (cli._end_process): every line
    of stderr and of the log file is there, the files it wrote are whole, and the exit status
    is the command's, for a success and for a failure."""
    models = tmp_path / "models"
    models.mkdir()
    for i in range(50):
        (models / f"f{i}.bin").write_bytes(bytes([i]) * 1000)
    done = _backup_process(models, tmp_path / "backups", tmp_path / "log")
    assert done.returncode == 0, done.stderr
    log_text = (tmp_path / "log").read_text()
    assert log_text.endswith("files and the archive hash match the manifest\n")  # the last line, whole
    # The same lines on stderr (without timestamps there only under journald).
    assert log_text.splitlines() == done.stderr.splitlines()
    (backup,) = (tmp_path / "backups").glob("models-*")
    expected = [f"{backup.name}.tar.zst", f"{backup.name}.tar.zst.sha256", "SHA256SUMS", "manifest.json", "pack.json", "status.json"]
    assert sorted(p.name for p in backup.iterdir()) == sorted(expected)
    assert len((backup / "SHA256SUMS").read_text().splitlines()) == 50

    failed = _backup_process(tmp_path / "no-such-models", tmp_path / "backups", tmp_path / "missing-log")
    assert failed.returncode == 2
    assert "does not exist" in failed.stderr and "does not exist" in (tmp_path / "missing-log").read_text()


def test_the_process_waits_for_a_thread_that_is_not_a_daemon(tmp_path: Path) -> None:
    """A non-daemon thread still running when the command returns is waited for, as the
    interpreter's own exit does: its work is not cut short."""
    out = tmp_path / "out"
    done = _entry_after(
        f"import threading, time\ndef late(): time.sleep(0.5); open({str(out)!r}, 'w').write('done')\nthreading.Thread(target=late).start()\n",
        tmp_path,
    )
    assert out.read_text() == "done" and done.stdout.split()[-1:] == ["returned"]  # the interpreter's own exit


def test_a_backup_does_not_load_what_only_a_restore_or_the_inventory_needs(tmp_path: Path) -> None:
    """A backup's process starts without the restore, the inventory, tarfile (its headers are
    built by mlwarden.jobs.backup.archive for short ASCII names) or subprocess (only the
    exporter's heartbeat expectations run a child): less to import on every run."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.bin").write_bytes(b"a" * 100)
    code = (
        "import sys; from mlwarden import cli\n"
        f"code = cli.main(['backup', '--model-dir', {str(models)!r}, '--backup-dir', {str(tmp_path / 'backups')!r}])\n"
        "print(code, *(m in sys.modules for m in ('mlwarden.jobs.backup.restore', 'mlwarden.jobs.backup.inventory', 'tarfile', 'subprocess')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "False", "False", "False", "False"], done.stderr


def test_a_command_parses_with_its_own_parser_only_and_the_top_level_help_lists_them_all(capsys: pytest.CaptureFixture[str]) -> None:
    """Building a parser for every command cost each command's start 10 ms: only
    ``mlwarden --help`` builds them all."""
    chosen = cli.build_parser(cli.load_command("backup"))
    (subparsers,) = [action for action in chosen._actions if isinstance(action, argparse._SubParsersAction)]
    assert list(subparsers.choices) == ["backup"]
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {name}" in listed for name in ("backup", "restore", "cleanup", "relay", "exporter"))


def test_the_process_runs_the_finalizers_of_its_garbage_before_it_ends(tmp_path: Path) -> None:
    """What a normal exit's last collection does is done before the process ends without its
    teardown: a finalizer of an object in a garbage cycle still runs."""
    out = tmp_path / "out"
    _entry_after(
        f"import gc\nclass Held:\n    def __del__(self): open({str(out)!r}, 'w').write('finalized')\n"
        "held = Held(); held.me = held\ndel held\ngc.disable()\n",
        tmp_path,
    )
    assert out.read_text() == "finalized"
