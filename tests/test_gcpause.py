"""The collector pause used by the backup, the restore and the cleanup's walk."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from mlwarden.gcpause import cyclic_gc_paused, kept_until_exit


def test_the_collector_is_off_inside_and_back_after_even_on_an_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_what_is_kept_until_exit_is_frozen_only_in_the_mlwarden_process() -> None:
    before = gc.get_freeze_count()
    with kept_until_exit():
        assert not gc.isenabled()
        kept = [{"model": i} for i in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() == before and kept  # a test's process: nothing frozen
    code = (
        "import gc; from mlwarden import gcpause; gcpause.command_owns_process()\n"
        "with gcpause.kept_until_exit(): kept = [{'model': i} for i in range(1000)]\n"
        "print(gc.isenabled(), gc.get_freeze_count() >= 1000)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], done.stderr
