"""Hold off Python's cyclic garbage collector through a loop that makes many objects and no cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block; the collector resumes (if it ran before) after it.

    A walk over many files allocates a few tracked objects per file (stat results, records,
    plan entries) and keeps them, but makes no reference cycles; every few hundred
    allocations would still start a collection, and the oldest generation's traverse every
    object kept so far: 15-20% of a 20,000-file backup's scan and write. Reference counting
    still frees everything at once.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
