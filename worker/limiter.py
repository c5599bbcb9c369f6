"""Rate limiting in front of every provider call: requests and tokens together, spread over the second.

The algorithm is GCRA (a theoretical arrival time, TAT, per limit) applied to two limits at once.
The spec below is implemented twice, by the pure functions in this module (`LocalRateLimiter`,
one process) and by `_LUA` (`RedisRateLimiter`, every process on one Redis key). The two are
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

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from redis.exceptions import RedisError

from worker.errors import ProviderThrottled, RetryLater

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# Tuning shared by the pure functions and the Lua script (passed to it as arguments, in this order).
STRIKE_RESET_S = 60.0  # a minute without a 429 forgives the strikes
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
AIMD_WINDOW_S = 60.0  # each clean window of this length raises the rate factor...
AIMD_STEP = 0.05  # ...by this much
AIMD_FLOOR = 0.1
AIMD_CUT_SPACING_S = 5.0  # at most one halving per this many seconds
_EPSILON_S = 1e-6  # a scheduled reservation is made this much after its turn (float rounding)
_TUNING = (
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


def _acquire(
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

        return _acquire(reserve, tokens, timeout_s, self.limits.schedule_ahead_s, self._clock, self._sleep)

    def settle(self, permit: Permit, billed_tokens: int) -> None:
        with self._lock:
            settle(self._state, self.limits, self._clock(), permit.tokens, billed_tokens)

    def throttled(self, retry_after_s: float | None = None, *, permit: Permit | None = None) -> float:
        with self._lock:
            jitter = self._rng.random()
            granted_at = permit.granted_at if permit else None
            return strike(self._state, self._clock(), retry_after_s, jitter, granted_at)


# The same operations as the pure functions above, on one hash, atomically (a script runs alone).
# KEYS[1]: the limiter's hash.
# ARGV: op ('reserve' | 'settle' | 'strike'), now ('' = Redis TIME), requests_per_minute,
#       tokens_per_minute, burst_s, the 7 numbers of _TUNING, then per op:
#       reserve: tokens; settle: estimated, billed; strike: retry_after ('' = none), jitter,
#       granted_at ('' = unknown).
# Returns {result, now} as strings (a Lua number would come back truncated to an integer):
# reserve → the wait (0 = granted), settle → 0, strike → the cooldown still to run.
_LUA = """
local key = KEYS[1]
local op = ARGV[1]
local now
if ARGV[2] == '' then
  if redis.replicate_commands then redis.replicate_commands() end
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local rpm, tpm, burst = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local STRIKE_RESET, BACKOFF_BASE, BACKOFF_MAX = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local WINDOW, STEP = tonumber(ARGV[9]), tonumber(ARGV[10])
local FLOOR, CUT_SPACING = tonumber(ARGV[11]), tonumber(ARGV[12])
local EPSILON = 1e-6

local names = {'request_tat', 'token_tat', 'cooldown_until', 'strikes', 'last_strike_at',
               'rate_factor', 'last_cut_at', 'last_raise_at'}
local stored = redis.call('HMGET', key, unpack(names))
local s = {}
for i, name in ipairs(names) do s[name] = tonumber(stored[i]) or 0 end
if not stored[6] then s.rate_factor = 1 end

local function age(t)
  if s.strikes > 0 and t - s.last_strike_at >= STRIKE_RESET then s.strikes = 0 end
  if s.rate_factor < 1 then
    local anchor = math.max(s.last_strike_at, s.last_raise_at)
    local windows = math.floor((t - anchor) / WINDOW)
    if windows >= 1 then
      s.rate_factor = math.min(1, s.rate_factor + STEP * windows)
      s.last_raise_at = anchor + windows * WINDOW
    end
  end
end

local function try_reserve(t, tokens)
  age(t)
  local wait = math.max(s.request_tat - burst - t, s.token_tat - burst - t, s.cooldown_until - t, 0)
  if wait > 0 then return wait end
  s.request_tat = math.max(s.request_tat, t) + 60 / (rpm * s.rate_factor)
  s.token_tat = math.max(s.token_tat, t) + tokens * (60 / (tpm * s.rate_factor))
  return 0
end

local result
local granted = 0
if op == 'reserve' then
  local tokens, ahead = tonumber(ARGV[13]), tonumber(ARGV[14]) or 0
  result = try_reserve(now, tokens)
  if result == 0 then
    granted = 1
  elseif result <= ahead and s.cooldown_until <= now then
    local at = now + result + EPSILON
    if try_reserve(at, tokens) == 0 then
      granted = 1
      result = at - now
    end
  end
elseif op == 'settle' then
  age(now)
  local estimated, billed = tonumber(ARGV[13]), tonumber(ARGV[14])
  s.token_tat = math.max(now, s.token_tat + (billed - estimated) * (60 / (tpm * s.rate_factor)))
  result = 0
elseif op == 'strike' then
  age(now)
  local retry_after = tonumber(ARGV[13]) or 0
  local jitter = tonumber(ARGV[14])
  local granted_at = tonumber(ARGV[15])
  local pause
  if now < s.cooldown_until or (granted_at ~= nil and granted_at < s.last_strike_at) then
    pause = retry_after
  else
    s.strikes = s.strikes + 1
    s.last_strike_at = now
    local backoff = math.min(BACKOFF_MAX, BACKOFF_BASE * 2 ^ math.min(s.strikes - 1, 16))
    pause = math.max(retry_after, backoff * (0.5 + jitter / 2))
    if now - s.last_cut_at >= CUT_SPACING then
      s.rate_factor = math.max(FLOOR, s.rate_factor * 0.5)
      s.last_cut_at = now
    end
  end
  s.cooldown_until = math.max(s.cooldown_until, now + pause)
  result = math.max(0, s.cooldown_until - now)
else
  return redis.error_reply('unknown op ' .. tostring(op))
end

local fields = {}
for _, name in ipairs(names) do
  fields[#fields + 1] = name
  fields[#fields + 1] = string.format('%.17g', s[name])
end
redis.call('HSET', key, unpack(fields))

-- Expire once the state is back to neutral (TATs passed, strikes forgiven, rate recovered).
local horizon = math.max(s.request_tat, s.token_tat, s.cooldown_until, s.last_strike_at + STRIKE_RESET)
if s.rate_factor < 1 then
  local anchor = math.max(s.last_strike_at, s.last_raise_at)
  horizon = math.max(horizon, anchor + math.ceil((1 - s.rate_factor) / STEP) * WINDOW)
end
local ttl_s = math.min(math.max(horizon - now, 0) + 60, 86400)
redis.call('PEXPIRE', key, string.format('%d', math.ceil(ttl_s * 1000)))

return {string.format('%.17g', result), string.format('%.17g', now), tostring(granted)}
"""


def limiter_key(model: str, root: str) -> str:
    """The Redis key of the limiter shared by every process calling `model` at `root` (region URL)."""
    return f"sidecar:ratelimit:{root}:{model}"


class RedisRateLimiter:
    """The limiter shared by every process (on every host) that uses the same Redis key.

    Time is Redis `TIME`, one clock for all hosts, unless `clock` is given: then Python passes
    its `now` to the script (how tests inject time).
    """

    def __init__(
        self,
        client: redis.Redis,
        limits: Limits,
        *,
        key: str,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.limits = limits
        self.key = key
        self._client = client
        self._script = client.register_script(_LUA)
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(seed)

    def acquire(self, tokens: int, *, timeout_s: float) -> Permit:
        def reserve(ahead_s: float) -> tuple[bool, float, float]:
            wait, now, granted = self._run("reserve", tokens, ahead_s)
            return bool(granted), wait, now

        try:
            return _acquire(
                reserve,
                tokens,
                timeout_s,
                self.limits.schedule_ahead_s,
                self._clock or time.monotonic,
                self._sleep,
            )
        except RedisError as exc:
            raise RetryLater(f"rate limiter: Redis unavailable ({type(exc).__name__})") from exc

    def settle(self, permit: Permit, billed_tokens: int) -> None:
        try:
            self._run("settle", permit.tokens, billed_tokens)
        except RedisError as exc:  # a missed correction only costs a little accuracy
            log.warning("limiter.settle_failed key=%s error=%s", self.key, type(exc).__name__)

    def throttled(self, retry_after_s: float | None = None, *, permit: Permit | None = None) -> float:
        jitter = self._rng.random()
        granted_at = "" if permit is None else permit.granted_at
        retry_after = "" if retry_after_s is None else retry_after_s
        try:
            pause, _now, _ = self._run("strike", retry_after, jitter, granted_at)
        except RedisError as exc:
            log.warning("limiter.strike_failed key=%s error=%s", self.key, type(exc).__name__)
            return retry_after_s or 0.0
        return pause

    def state(self) -> GcraState:
        """The shared state as stored (before ageing); a fresh state when the key has expired."""
        stored = {k.decode(): float(v) for k, v in self._client.hgetall(self.key).items()}
        state = GcraState(**stored)
        state.strikes = int(state.strikes)
        return state

    def _run(self, op: str, *args: float | int | str) -> tuple[float, float, float]:
        now = "" if self._clock is None else repr(self._clock())
        limits = (self.limits.requests_per_minute, self.limits.tokens_per_minute, self.limits.burst_s)
        result, now_s, granted = self._script(keys=[self.key], args=[op, now, *limits, *_TUNING, *args])
        return float(result), float(now_s), float(granted)
