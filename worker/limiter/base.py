"""Rate limiting in front of every provider call: requests and tokens together, spread over the second.

The algorithm is GCRA (a theoretical arrival time, TAT, per limit) applied to two limits at once.
The spec below is implemented twice, by the pure functions in this module (`LocalRateLimiter` in
worker/limiter/local.py, one process) and by a Lua script (`RedisRateLimiter` in
worker/limiter/redis.py, every process on one Redis key). The two are
tested against each other, operation by operation, so both give the same decisions.

* **Reserve** one request and the estimated tokens in one step, both or neither. It goes when both
  TATs are at most `burst_s` ahead of now and no cooldown is running; then each TAT moves to
  `max(tat, now) + cost / rate`. With `burst_s = 0` (the default) requests are spaced evenly,
  never more than a second's worth in any second, and each call waits until the tokens of the
  calls before it are paid for, so the provider's per-second limits (RPS, TPS) never see a burst.
  A request larger than a second of tokens still goes once the token bucket is empty.
* **Settle** moves the token TAT by `(billed - estimated) / rate`: a refund for an over-estimate
  (never below now, so no credit is banked), a later start for the next caller after an
  under-estimate.
* **Strike** (a 429) sets `cooldown_until = now + max(Retry-After, backoff)` for everyone, with
  `backoff = min(30, 0.5 * 2**(strikes-1)) * (0.5 + jitter/2)`; the jitter is drawn in Python so
  the script stays deterministic. A 429 for a request sent before the last strike (or arriving
  during the cooldown) is an echo of that strike: it honours its Retry-After but counts no new
  strike. A minute without a strike forgives the strikes.
* **AIMD**: the configured rates are multiplied by `rate_factor` in [0.1, 1]. A strike halves it
  (at most once per 5 s); each clean 60 s window since the later of the last strike and the last
  raise adds 0.05. Ageing (forgiveness and raises) runs at the start of every operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.errors import ProviderThrottled

# Tuning shared by the pure functions and the Lua script (passed to it as arguments, in this order).
STRIKE_RESET_S = 60.0  # a minute without a 429 forgives the strikes
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
AIMD_WINDOW_S = 60.0  # each clean window of this length raises the rate factor...
AIMD_STEP = 0.05  # ...by this much
AIMD_FLOOR = 0.1
AIMD_CUT_SPACING_S = 5.0  # at most one halving per this many seconds
_EPSILON_S = 1e-6  # a scheduled reservation is made this much after its turn (float rounding)
TUNING = (
    STRIKE_RESET_S,
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    AIMD_WINDOW_S,
    AIMD_STEP,
    AIMD_FLOOR,
    AIMD_CUT_SPACING_S,
)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float
    tokens_per_minute: float
    burst_s: float = 0.0  # how far ahead of now a TAT may run; 0 spreads calls evenly over the second
    # A caller that would wait at most this long (and no cooldown runs) is granted a slot at its
    # exact time and sleeps until then, so no capacity is lost to threads that wake up late.
    schedule_ahead_s: float = 0.0


@dataclass(frozen=True)
class Permit:
    tokens: int
    granted_at: float  # in the limiter's clock (Redis TIME for a RedisRateLimiter without a clock)


@dataclass
class GcraState:
    request_tat: float = 0.0  # theoretical arrival time of the next request
    token_tat: float = 0.0
    cooldown_until: float = 0.0
    strikes: int = 0  # 429s since the last clean minute
    last_strike_at: float = 0.0
    rate_factor: float = 1.0  # AIMD multiplier on the configured rates
    last_cut_at: float = 0.0
    last_raise_at: float = 0.0


def age(state: GcraState, now: float) -> None:
    """Forgive the strikes after a clean minute; raise the rate factor for each clean window."""
    if state.strikes and now - state.last_strike_at >= STRIKE_RESET_S:
        state.strikes = 0
    if state.rate_factor < 1.0:
        anchor = max(state.last_strike_at, state.last_raise_at)
        windows = math.floor((now - anchor) / AIMD_WINDOW_S)
        if windows >= 1:
            state.rate_factor = min(1.0, state.rate_factor + AIMD_STEP * windows)
            state.last_raise_at = anchor + windows * AIMD_WINDOW_S


def try_reserve(state: GcraState, limits: Limits, now: float, tokens: int) -> float:
    """Reserve one request and `tokens` if both fit now (returns 0.0), else the wait in seconds."""
    age(state, now)
    wait = max(
        state.request_tat - limits.burst_s - now,
        state.token_tat - limits.burst_s - now,
        state.cooldown_until - now,
        0.0,
    )
    if wait > 0.0:
        return wait
    request_interval = 60.0 / (limits.requests_per_minute * state.rate_factor)
    token_interval = 60.0 / (limits.tokens_per_minute * state.rate_factor)
    state.request_tat = max(state.request_tat, now) + request_interval
    state.token_tat = max(state.token_tat, now) + tokens * token_interval
    return 0.0


def reserve_ahead(
    state: GcraState, limits: Limits, now: float, tokens: int, ahead_s: float
) -> tuple[bool, float]:
    """(granted, wait): `try_reserve`, or when the wait is at most `ahead_s` and no cooldown runs,
    a reservation at `now + wait`, its exact turn (the caller sleeps `wait`, then sends)."""
    wait = try_reserve(state, limits, now, tokens)
    if wait == 0.0:
        return True, 0.0
    if wait <= ahead_s and state.cooldown_until <= now:
        at = now + wait + _EPSILON_S
        if try_reserve(state, limits, at, tokens) == 0.0:
            return True, at - now
    return False, wait


def settle(state: GcraState, limits: Limits, now: float, estimated: int, billed: int) -> None:
    """Correct the token debit with the billed usage (a refund when the estimate was high)."""
    age(state, now)
    token_interval = 60.0 / (limits.tokens_per_minute * state.rate_factor)
    state.token_tat = max(now, state.token_tat + (billed - estimated) * token_interval)


def strike(
    state: GcraState,
    now: float,
    retry_after_s: float | None,
    jitter: float,
    granted_at: float | None = None,
) -> float:
    """A 429: a cooldown for everyone; returns how long it still runs. `jitter` is in [0, 1)."""
    age(state, now)
    retry_after = retry_after_s or 0.0
    echo = now < state.cooldown_until or (granted_at is not None and granted_at < state.last_strike_at)
    if echo:
        pause = retry_after
    else:
        state.strikes += 1
        state.last_strike_at = now
        backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(state.strikes - 1, 16))
        pause = max(retry_after, backoff * (0.5 + jitter / 2))
        if now - state.last_cut_at >= AIMD_CUT_SPACING_S:
            state.rate_factor = max(AIMD_FLOOR, state.rate_factor * 0.5)
            state.last_cut_at = now
    state.cooldown_until = max(state.cooldown_until, now + pause)
    return max(0.0, state.cooldown_until - now)


class RateLimiter(Protocol):
    def acquire(self, tokens: int, *, timeout_s: float) -> Permit:
        """Block until one request and `tokens` fit; ProviderThrottled after `timeout_s`."""
        ...

    def settle(self, permit: Permit, billed_tokens: int) -> None: ...

    def throttled(self, retry_after_s: float | None = None, *, permit: Permit | None = None) -> float:
        """Tell every user of this limiter that the provider answered 429; returns the pause.

        Pass the throttled call's `permit` so that the 429s of requests already in flight when the
        first one arrived count as one strike, not many.
        """
        ...


def acquire_loop(
    reserve: Callable[[float], tuple[bool, float, float]],
    tokens: int,
    timeout_s: float,
    ahead_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Permit:
    """Try `reserve(ahead_s)` (→ granted, wait, now) until it grants, or raise once the wait
    would pass the deadline. A grant with a wait is a slot booked ahead: sleep, then go."""
    deadline = clock() + timeout_s
    while True:
        granted, wait, now = reserve(max(0.0, min(ahead_s, deadline - clock())))
        if granted:
            if wait > 0.0:
                sleep(wait)
            return Permit(tokens=tokens, granted_at=now + wait)
        if clock() + wait > deadline:
            raise ProviderThrottled(
                f"rate limiter: no room for {tokens} tokens within {timeout_s:.1f}s",
                retry_after_s=wait,
            )
        sleep(min(wait, 1.0))  # wake at least every second: a refund elsewhere may free room sooner
