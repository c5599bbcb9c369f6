"""Rate limiting in front of every provider call: requests and tokens together, spread over the second.

The algorithm is GCRA (a theoretical arrival time per limit) applied to two limits at once:
one request and the estimated tokens are reserved in one step, both or neither. The billed
usage corrects the token debit afterwards, and a 429 sets a cooldown with exponential backoff.
`LocalRateLimiter` runs it in-process; a Redis implementation shares it across processes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.errors import ProviderThrottled


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float
    tokens_per_minute: float
    burst_s: float = 1.0  # the most that may go out at once: one second's worth


@dataclass(frozen=True)
class Permit:
    tokens: int
    granted_at: float


@dataclass
class GcraState:
    request_tat: float = 0.0  # theoretical arrival time of the next request
    token_tat: float = 0.0
    cooldown_until: float = 0.0
    strikes: int = 0  # consecutive 429s
    last_strike_at: float = 0.0


def try_reserve(state: GcraState, limits: Limits, now: float, tokens: int) -> float:
    """Reserve one request and `tokens` if both fit now (returns 0.0), else the wait in seconds.

    Pure arithmetic on `state`; mutated only when the reservation is granted.
    """
    request_interval = 60.0 / limits.requests_per_minute
    token_interval = 60.0 / limits.tokens_per_minute
    request_tat = max(state.request_tat, now) + request_interval
    token_tat = max(state.token_tat, now) + tokens * token_interval
    # A request larger than a second's worth of tokens may go when the bucket is empty.
    token_burst = max(limits.burst_s, tokens * token_interval)
    wait = max(
        request_tat - limits.burst_s - now,
        token_tat - token_burst - now,
        state.cooldown_until - now,
        0.0,
    )
    if wait > 0:
        return wait
    state.request_tat, state.token_tat = request_tat, token_tat
    return 0.0


def settle(state: GcraState, limits: Limits, now: float, estimated: int, billed: int) -> None:
    """Correct the token debit with the billed usage (a refund when the estimate was high)."""
    state.token_tat = max(now, state.token_tat + (billed - estimated) * 60.0 / limits.tokens_per_minute)
    if state.strikes and now - state.last_strike_at > 60.0:
        state.strikes = 0  # a clean minute: back to normal


def strike(state: GcraState, now: float, retry_after_s: float | None, rng: random.Random) -> float:
    """A 429: cooldown for everyone, doubling with each consecutive one (full jitter, capped)."""
    state.strikes += 1
    state.last_strike_at = now
    backoff = min(30.0, 0.5 * 2 ** (state.strikes - 1))
    pause = max(retry_after_s or 0.0, backoff * (0.5 + rng.random() / 2))
    state.cooldown_until = max(state.cooldown_until, now + pause)
    return pause


class RateLimiter(Protocol):
    def acquire(self, tokens: int, *, timeout_s: float) -> Permit:
        """Block until one request and `tokens` fit; ProviderThrottled after `timeout_s`."""
        ...

    def settle(self, permit: Permit, billed_tokens: int) -> None: ...

    def throttled(self, retry_after_s: float | None = None) -> float:
        """Tell every user of this limiter that the provider answered 429; returns the pause."""
        ...


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

    def acquire(self, tokens: int, *, timeout_s: float) -> Permit:
        deadline = self._clock() + timeout_s
        while True:
            with self._lock:
                now = self._clock()
                wait = try_reserve(self._state, self.limits, now, tokens)
            if wait == 0.0:
                return Permit(tokens=tokens, granted_at=now)
            if now + wait > deadline:
                raise ProviderThrottled(
                    f"rate limiter: no room for {tokens} tokens within {timeout_s:.1f}s",
                    retry_after_s=wait,
                )
            self._sleep(min(wait, 1.0))

    def settle(self, permit: Permit, billed_tokens: int) -> None:
        with self._lock:
            settle(self._state, self.limits, self._clock(), permit.tokens, billed_tokens)

    def throttled(self, retry_after_s: float | None = None) -> float:
        with self._lock:
            return strike(self._state, self._clock(), retry_after_s, self._rng)
