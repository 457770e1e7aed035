"""Hash in a helper thread while the calling thread compresses or decompresses.

hashlib and zstandard release the GIL on large buffers, so a SHA-256 of one chunk and the
(de)compression of the same chunk run on two cores at once. Each :class:`Overlap` keeps its
own calls in order (one pending at a time); the data passed must not be mutated meanwhile
(``bytes`` never are).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlwarden-hash")


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
