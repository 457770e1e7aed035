"""One retry delay policy for every loop that tries again: exponential, capped, full jitter.

Try ``n`` (counting failures from 1) waits a uniform random time between zero and
``min(maximum, initial * 2**(n-1))``. "Full jitter" spreads the retries of many clients
that failed together (a fleet of jobs when the Pushgateway restarts, relay replicas when
Slack answers 503) over the whole window instead of bunching them at its middle, which is
what "equal" jitter and a fixed factor do; the cap keeps one outage from growing the wait
beyond what an operator expects. Randomness and time are injected so tests need no sleep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# 2**62 times any sensible initial delay is beyond every cap; it keeps a loop that has failed
# for months (the exporter with a GPU gone) from overflowing a float.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float
    rand: Callable[[], float] = field(default=random.random, compare=False)

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failure number ``attempt`` (1 for the first)."""
        return min(self.maximum, self.initial * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failure number ``attempt`` before the next try."""
        return self.ceiling(attempt) * self.rand()


class RetrySchedule:
    """For loops that poll instead of sleeping: may the next try happen now?"""

    def __init__(self, policy: Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._failures = 0
        self._next = 0.0

    def ready(self) -> bool:
        return self._clock() >= self._next

    def failed(self) -> None:
        self._failures += 1
        self._next = self._clock() + self.policy.delay(self._failures)

    def reset(self) -> None:
        self._failures = 0
        self._next = 0.0
