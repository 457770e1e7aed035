"""Group commit: webhooks that arrive together share one store transaction.

Every webhook is still answered only after its own payload, states and jobs are committed.
Under load, the webhooks that were read while one commit ran go into the next commit
together, so a commit's fixed cost (writing the WAL pages of the tables and indexes) is paid
once per batch instead of once per webhook. One webhook at a time is a plain commit: nothing
waits for a timer. Under a backlog, a batch's webhooks are answered before the next batch
is written: an answer waits for the commits before its own, never for the one after it.
Commits run in a worker thread, one at a time, while the event loop goes on serving.
"""

from __future__ import annotations

import asyncio

from mlwarden.relay.store.base import IntakeRequest, IntakeResult, Store

MAX_BATCH = 64


class GroupCommit:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._waiting: list[tuple[IntakeRequest, asyncio.Future[IntakeResult | None]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def submit(self, request: IntakeRequest) -> IntakeResult | None:
        """Store ``request`` (None: a duplicate); raises what the store raised for its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IntakeResult | None] = loop.create_future()
        self._waiting.append((request, future))
        if self._committer is None:
            # Its first step runs after every handler that is ready in this turn of the loop
            # has queued its webhook.
            self._committer = loop.create_task(self._commit_waiting())
        return await future

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
                await self._commit(batch)
                # Let this batch's handlers answer before the next batch is written.
                await asyncio.sleep(0)
        finally:
            self._committer = None

    async def _commit(self, batch: list[tuple[IntakeRequest, asyncio.Future[IntakeResult | None]]]) -> None:
        try:
            # In a thread: a store that stalls (Redis, up to its socket timeout) must not stop the
            # event loop answering health checks and reading the next webhooks meanwhile.
            results = await asyncio.to_thread(self._store.intake_batch, [request for request, _ in batch])
        except Exception as exc:  # the whole batch failed together; each webhook gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
