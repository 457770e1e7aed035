"""Hash in a helper thread while the calling thread compresses or decompresses.

hashlib and zstandard release the GIL on large buffers, so a SHA-256 of one chunk and the
(de)compression of the same chunk run on two cores at once. Each :class:`Overlap` keeps its
own calls in order (one pending at a time); the data passed must not be mutated meanwhile
(``bytes`` never are).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlwarden-hash")


_pool = _new_pool()


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's threads: a pool that thinks it has would
    # accept work and never run it.
    global _pool
    _pool = _new_pool()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Overlap:
    def __init__(self) -> None:
        self._pending: Future[Any] | None = None

    def run(self, fn: Callable[[bytes], Any], data: bytes) -> None:
        """Run ``fn(data)`` in the helper thread, after this Overlap's previous call finished."""
        self.wait()
        self._pending = _pool.submit(fn, data)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> Overlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()
