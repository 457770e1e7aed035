"""Run one function over several inputs at once, in forked processes.

The planner's walk is bound by Python's cost per file, not by the disk (the metadata is
usually cached), so one process uses one core however many the machine has. Threads do
not help: the GIL serialises the Python work between the system calls. Forked children
do: each inherits the open directory descriptors, walks its share, and sends back what it
found, pickled, through a pipe.

A child has only the thread that forked it. What it runs must not need a lock that another
thread of the parent might have held at the fork; the logging module re-initialises its own
locks in a child, and the planner's walk takes no other.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class WorkerFailed(RuntimeError):
    """A child died without sending its result (killed, out of memory)."""


def fork_map(function: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``[function(item) for item in items]``: the first item here, each other one in a child.

    An exception raised in a child is raised here. If anything fails, the children still
    running are killed: they only read, so nothing is left half done.
    """
    children: list[tuple[int, BinaryIO]] = []  # (pid, read end of its pipe)
    try:
        for item in items[1:]:
            children.append(_fork(function, item))
        results = [function(items[0])]
        results.extend(_collect(pid, pipe) for pid, pipe in children)
        return results
    finally:
        for pid, pipe in children:
            pipe.close()
            _reap(pid)


def _fork(function: Callable[[Item], Result], item: Item) -> tuple[int, BinaryIO]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(function, item, write_fd)
    os.close(write_fd)
    return pid, os.fdopen(read_fd, "rb")


def _child(function: Callable[[Item], Result], item: Item, write_fd: int) -> None:
    """Runs in the child; never returns. ``os._exit`` skips the parent's atexit handlers
    and does not flush stdio buffers that the parent will flush itself."""
    status = 0
    try:
        try:
            outcome: tuple[bool, object] = (True, function(item))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            outcome = (False, exc)
        with os.fdopen(write_fd, "wb") as pipe:
            try:
                payload = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - an exception that cannot be pickled
                payload = pickle.dumps((False, RuntimeError(f"{outcome[1]!r} (and it could not be sent: {exc})")))
            pipe.write(payload)
    except BaseException:  # noqa: BLE001 - the parent sees no result and reports the worker failed
        status = 1
    finally:
        os._exit(status)


def _collect(pid: int, pipe: BinaryIO) -> Any:  # what the child pickled: a Result of fork_map's function
    payload = pipe.read()  # until the child closes its end: all of it, or nothing if it died
    pipe.close()
    _, status = os.waitpid(pid, 0)
    if not payload:
        raise WorkerFailed(f"a worker (pid {pid}) ended without a result: {_describe(status)}")
    ok, value = pickle.loads(payload)
    if not ok:
        raise value
    return value


def _reap(pid: int) -> None:
    """Wait for a child that :func:`_collect` did not reach, killing it if it still runs."""
    try:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:  # reaped already
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
