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


# The ``mlwarden`` process itself (not a test or a program that imports mlwarden) ends with its
# command: what it keeps until then may be taken out of the collector's reach. Its entry sets this.
_COMMAND_OWNS_PROCESS = False


def command_owns_process() -> None:
    """Called by the ``mlwarden`` process entry only: :func:`kept_until_exit` may freeze."""
    global _COMMAND_OWNS_PROCESS
    _COMMAND_OWNS_PROCESS = True


@contextmanager
def kept_until_exit() -> Iterator[None]:
    """Objects made inside the block stay until the process ends (modules, an S3 client and its
    models): no cyclic collection while they are made, and in the ``mlwarden`` process they are
    then frozen, never traversed again (the first collection after a pause, and the last one at
    exit, would each go over all of them: 25-60 ms of a second backup's CPU). What is garbage
    before the block is collected first: frozen, a cycle would never go, and one can hold what
    a thread waits for (a reader's pipe, say) so that the process never exits. Elsewhere the
    collector simply resumes."""
    if _COMMAND_OWNS_PROCESS:
        gc.collect()
    with cyclic_gc_paused():
        yield
        if _COMMAND_OWNS_PROCESS:
            gc.freeze()
