"""Drain the durable outbox: per-destination rate limits, coalescing, retry with backoff, dead letters.

One dispatcher pass looks at every destination that has no delivery in flight and whose
rate limit allows a message now, claims up to the notifier's batch size of due jobs (for
Slack that coalesces everything that queued up into one message) and sends them. The store
hands out only the head of each key's line (see store.base), so a notice never overtakes an
earlier one of its key, however its retries go; among heads, emergency and critical notices
come first, so within a destination's rate limit they overtake queued warnings. A flood of
warnings is folded into one digest message (per Alertmanager group within it). A
retryable failure reschedules the jobs with exponential backoff and jitter, or after the
service's Retry-After (which also holds back the whole destination); a permanent failure or
the last allowed attempt dead-letters them. Time and randomness are injected so tests run
a storm without sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

from mlwarden.relay.config import Delivery, Destination
from mlwarden.relay.metrics import RelayMetrics
from mlwarden.relay.notifiers.base import DeliveryError, Notifier
from mlwarden.relay.store.base import Job, Store, StoreError, severity_rank

from mlwarden.backoff import Backoff
from mlwarden.logs import RepeatFilter

log = logging.getLogger(__name__)
log.addFilter(RepeatFilter(about=(StoreError,)))  # with the store down, every pass would log the same error
DIGEST_RANK = severity_rank("warning")  # warnings and info may be folded into a digest
CLAIM_STEP = 200  # jobs per claim call while gathering a digest (a Redis claim is one script, which blocks the server)
MAX_RETRY_AFTER_SECONDS = 3600.0  # Slack and PagerDuty ask for seconds to minutes


class RateLimit:
    """At most ``rate_per_second`` messages per second to one destination, no bursts."""

    def __init__(self, rate_per_second: float) -> None:
        self.interval = 1.0 / rate_per_second
        self.next_at = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def spend(self, now: float) -> None:
        self.next_at = max(self.next_at, now) + self.interval

    def hold_until(self, when: float) -> None:
        self.next_at = max(self.next_at, when)


class Outbox:
    def __init__(
        self,
        store: Store,
        destinations: Mapping[str, Destination],
        notifiers: Mapping[str, Notifier],
        delivery: Delivery,
        metrics: RelayMetrics,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        workers: int = 4,
    ) -> None:
        self._store = store
        self._notifiers = notifiers
        self._delivery = delivery
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self._limits = {name: RateLimit(d.rate_per_second) for name, d in destinations.items()}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(workers)
        self._wake = asyncio.Event()
        self._lease = delivery.claim_seconds

    def reconfigure(self, destinations: Mapping[str, Destination], notifiers: Mapping[str, Notifier],
                    delivery: Delivery) -> None:
        """Use a reloaded config from the next pass on; deliveries in flight finish as they began.
        A destination that keeps its rate keeps its limiter, so a reload cannot let a burst through."""
        self._limits = {
            name: self._limits[name] if name in self._limits and self._limits[name].interval == 1.0 / d.rate_per_second
            else RateLimit(d.rate_per_second)
            for name, d in destinations.items()
        }
        self._notifiers = notifiers
        self._delivery = delivery
        self._lease = delivery.claim_seconds

    def wake(self) -> None:
        """New jobs are queued: look now instead of at the next tick."""
        self._wake.set()

    async def dispatch(self) -> list[asyncio.Task[None]]:
        """Start one delivery per destination that may send now and has due jobs.

        Store calls here and below run in a thread: a store that stalls (Redis, up to its
        socket timeout) must not stop the event loop taking webhooks meanwhile.
        """
        started = []
        now = self._clock()
        for name, notifier in self._notifiers.items():
            if name in self._in_flight or not self._limits[name].ready(now):
                continue
            jobs = await asyncio.to_thread(self._store.claim, name, now, notifier.max_batch, self._lease)
            if not jobs:
                continue
            if notifier.digest_batch > len(jobs) == notifier.max_batch and all(j.rank <= DIGEST_RANK for j in jobs):
                # A flood of warnings (claims come highest priority first, so nothing urgent waits):
                # one digest instead of a message per max_batch, which at Slack's 1 message/s
                # would hold the destination for minutes.
                jobs += await self._claim_more(name, now, notifier.digest_batch - len(jobs), jobs[-1])
            self._limits[name].spend(now)
            task = asyncio.create_task(self._deliver(name, notifier, jobs))
            self._in_flight[name] = task
            task.add_done_callback(functools.partial(self._finished, name))
            started.append(task)
        return started

    def _finished(self, name: str, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(name, None)

    async def _claim_more(self, name: str, now: float, count: int, after: Job) -> list[Job]:
        """Up to ``count`` more jobs after ``after`` (the last one claimed), in steps of CLAIM_STEP.
        Each step goes on behind the previous one: started from the top, the 25th step of a digest
        of 5,000 read past 4,800 leased jobs first, and the steps together cost more than the rest
        of the delivery. All steps run in one thread call: a call per step woke a worker thread and
        then the event loop 25 times for each digest."""
        return await asyncio.to_thread(self._claim_steps, name, now, count, after)

    def _claim_steps(self, name: str, now: float, count: int, after: Job) -> list[Job]:
        claimed: list[Job] = []
        while len(claimed) < count:
            step = self._store.claim(name, now, min(CLAIM_STEP, count - len(claimed)), self._lease, after)
            claimed += step
            if len(step) < CLAIM_STEP:
                break
            after = step[-1]
        return claimed

    async def run_once(self) -> int:
        """One dispatcher pass, waiting for its deliveries; returns how many messages were attempted."""
        tasks = await self.dispatch()
        await asyncio.gather(*tasks)
        return len(tasks)

    async def run(self, tick: float = 0.2) -> None:
        while True:
            try:
                await self.dispatch()
            except StoreError as exc:
                log.error("outbox: cannot claim jobs: %s", exc)
            except Exception:  # noqa: BLE001 - a dead dispatcher would stop every delivery, silently
                log.exception("outbox: dispatcher pass failed; trying again at the next tick")
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation that
            # arrives as the wake-up does, and this loop then outlives the shutdown waiting for it.
            try:
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def drain(self) -> None:
        """Let deliveries in flight finish (shutdown)."""
        await asyncio.gather(*list(self._in_flight.values()), return_exceptions=True)

    async def _deliver(self, name: str, notifier: Notifier, jobs: Sequence[Job]) -> None:
        async with self._slots:
            try:
                await self._send(name, notifier, jobs)
            except StoreError as exc:
                # The outcome is not recorded: the lease runs out and the jobs are tried again
                # (a possible repeat, never a loss; PagerDuty's dedup_key absorbs the repeat).
                log.error("outbox: cannot record delivery to %s: %s", name, exc)

    async def _send(self, name: str, notifier: Notifier, jobs: Sequence[Job]) -> None:
        try:
            async with asyncio.timeout(self._delivery.timeout):  # see run(): not wait_for
                await notifier.send([j.notice for j in jobs])
        except DeliveryError as exc:
            await self._failed(name, jobs, exc)
        except TimeoutError:
            await self._failed(name, jobs, DeliveryError(f"{notifier.integration}: timed out", retryable=True))
        except Exception as exc:
            # Unclassified (a notifier bug, an httpx error outside timeout/transport): counted and
            # retried, then dead-lettered, like any failure. Left to escape, it ended the task
            # unseen and the jobs came back only after their lease, forever, uncounted, taking
            # down every coalesced batch they joined. Only the type is kept: the text may hold
            # the webhook URL.
            log.error("delivery to %s raised %s", name, type(exc).__name__, exc_info=True)
            await self._failed(name, jobs, DeliveryError(f"{notifier.integration}: {type(exc).__name__}", retryable=True))
        else:
            await asyncio.to_thread(self._store.delivered, jobs)
            self._metrics.deliveries.labels(name, notifier.integration).inc(len(jobs))
            log.info("delivered %d notice(s) to %s", len(jobs), name)

    async def _failed(self, name: str, jobs: Sequence[Job], error: DeliveryError) -> None:
        now = self._clock()
        attempt = max(j.attempts for j in jobs) + 1
        if not error.retryable or attempt >= self._delivery.max_attempts:
            reason = "permanent_failure" if not error.retryable else "retries_exhausted"
            orphans = await asyncio.to_thread(self._store.dead_letter, jobs, str(error))
            self._metrics.dead_letters.labels(reason).inc(len(jobs))
            log.error("dead-lettered %d notice(s) for %s after %d attempt(s): %s", len(jobs), name, attempt, error)
            if orphans:
                self._metrics.dead_letters.labels("trigger_undelivered").inc(orphans)
                log.warning("%d resolve notice(s) for %s not sent: their trigger never reached it", orphans, name)
            return
        delay = Backoff(self._delivery.backoff_initial, self._delivery.backoff_max, self._rand).delay(attempt)
        if error.retry_after is not None:
            # The service said when (sooner would only be refused again), but a Retry-After of
            # a day must not hold a destination's pages for a day.
            delay = min(error.retry_after, MAX_RETRY_AFTER_SECONDS)
            self._limits[name].hold_until(now + delay)
        await asyncio.to_thread(self._store.reschedule, jobs, now + delay, str(error))
        self._metrics.retries.labels(name, self._notifiers[name].integration).inc(len(jobs))
        log.warning("delivery to %s failed (attempt %d), retrying in %.1fs: %s", name, attempt, delay, error)
