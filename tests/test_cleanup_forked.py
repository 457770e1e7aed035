"""fork_map: results in order from real child processes, their failures raised here, none left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlwarden.jobs.cleanup.forked import WorkerFailed, fork_map

from mlwarden.interrupts import sigterm_interrupts


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_results_come_back_in_order_from_other_processes() -> None:
    results = fork_map(lambda n: (n * n, os.getpid()), [1, 2, 3, 4])
    assert [square for square, _ in results] == [1, 4, 9, 16]
    pids = [pid for _, pid in results]
    assert pids[0] == os.getpid() and len(set(pids)) == 4  # the first here, each other one in its own child
    assert all(_gone(pid) for pid in pids[1:])  # reaped, not zombies


def test_a_large_result_passes_through_the_pipe() -> None:
    assert fork_map(lambda n: b"x" * n, [1, 10**7]) == [b"x", b"x" * 10**7]


def test_an_exception_in_a_child_is_raised_here() -> None:
    def open_it(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    with pytest.raises(FileNotFoundError) as raised:
        fork_map(open_it, [os.devnull, "/nonexistent/mlwarden-test"])
    assert raised.value.filename == "/nonexistent/mlwarden-test"


def test_an_exception_that_cannot_be_pickled_still_reports() -> None:
    class Local(Exception):  # a class defined in a function cannot be pickled
        pass

    def fail(n: int) -> int:
        if n:
            raise Local("inside the worker")
        return n

    with pytest.raises(RuntimeError, match="inside the worker"):
        fork_map(fail, [0, 1])


def test_a_child_that_dies_is_reported() -> None:
    def die(n: int) -> int:
        if n:
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    with pytest.raises(WorkerFailed, match="killed by SIGKILL"):
        fork_map(die, [0, 1])


def test_when_this_process_fails_first_the_children_are_killed(tmp_path: Path) -> None:
    def work(n: int) -> int:
        if n == 0:
            while len(list(tmp_path.iterdir())) < 2:  # both children are running
                time.sleep(0.01)
            raise KeyError("here")
        (tmp_path / str(os.getpid())).touch()
        time.sleep(600)
        return n

    with pytest.raises(KeyError):
        fork_map(work, [0, 1, 2])
    assert all(_gone(int(p.name)) for p in tmp_path.iterdir())


def test_sigterm_to_the_whole_group_stops_the_walk_and_leaves_no_worker(tmp_path: Path) -> None:
    # systemd's stop signals every process of the unit: the workers and this one.
    def work(n: int) -> int:
        if n == 0:
            while len(list(tmp_path.iterdir())) < 2:
                time.sleep(0.01)
            for p in tmp_path.iterdir():
                os.kill(int(p.name), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(600)  # interrupted by the signal
        (tmp_path / str(os.getpid())).touch()
        time.sleep(600)
        return n

    handler = signal.getsignal(signal.SIGTERM)
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        fork_map(work, [0, 1, 2])
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    assert all(_gone(int(p.name)) for p in tmp_path.iterdir())
