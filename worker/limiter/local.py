"""The rate limiter of one process (all its threads): the pure GCRA functions under a lock."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from worker.limiter.base import GcraState, Limits, Permit, acquire_loop, reserve_ahead, settle, strike


class LocalRateLimiter:
    """The limiter for one process (all its threads)."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.limits = limits
        self._state = GcraState()
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(seed)

    def state(self) -> GcraState:
        with self._lock:
            return GcraState(**vars(self._state))

    def acquire(self, tokens: int, *, timeout_s: float) -> Permit:
        def reserve(ahead_s: float) -> tuple[bool, float, float]:
            with self._lock:
                now = self._clock()
                return (*reserve_ahead(self._state, self.limits, now, tokens, ahead_s), now)

        return acquire_loop(
            reserve, tokens, timeout_s, self.limits.schedule_ahead_s, self._clock, self._sleep
        )

    def settle(self, permit: Permit, billed_tokens: int) -> None:
        with self._lock:
            settle(self._state, self.limits, self._clock(), permit.tokens, billed_tokens)

    def throttled(self, retry_after_s: float | None = None, *, permit: Permit | None = None) -> float:
        with self._lock:
            jitter = self._rng.random()
            granted_at = permit.granted_at if permit else None
            return strike(self._state, self._clock(), retry_after_s, jitter, granted_at)
