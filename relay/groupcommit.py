"""Group commit: webhooks that arrive together share one store transaction.

Every webhook is still answered only after its own payload, states and jobs are committed.
Under load, the webhooks that were read while one commit ran go into the next commit
together, so a commit's fixed cost (writing the WAL pages of the tables and indexes) is paid
once per batch instead of once per webhook. One webhook at a time is a plain commit: nothing
waits for a timer. Under a backlog, a batch's webhooks are answered before the next batch
is written: an answer waits for the commits before its own, never for the one after it.
"""

from __future__ import annotations

import asyncio

from relay.store.base import IntakeRequest, IntakeResult, Store

MAX_BATCH = 64


class GroupCommit:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._waiting: list[tuple[IntakeRequest, asyncio.Future[IntakeResult | None]]] = []
        self._scheduled = False

    async def submit(self, request: IntakeRequest) -> IntakeResult | None:
        """Store ``request`` (None: a duplicate); raises what the store raised for its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IntakeResult | None] = loop.create_future()
        self._waiting.append((request, future))
        if not self._scheduled:
            # Runs after every handler that is ready in this turn of the loop has queued its webhook.
            self._scheduled = True
            loop.call_soon(self._commit)
        return await future

    def _commit(self) -> None:
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        try:
            results = self._store.intake_batch([request for request, _ in batch])
        except Exception as exc:  # the whole batch failed together; each webhook gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self._next()

    def _next(self) -> None:
        # Scheduled after the answers: this batch's handlers answer before the next batch is written.
        self._scheduled = bool(self._waiting)
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._commit)
