"""The rate limiter shared through Redis: the GCRA of worker/limiter/base.py as one Lua script.

The script runs alone on one hash, so every process (on every host) using the same key shares
one limiter; tests check it against the pure functions operation by operation.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from worker.errors import RetryLater
from worker.limiter.base import TUNING, GcraState, Limits, Permit, acquire_loop

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# The same operations as the pure functions of worker/limiter/base.py, on one hash, atomically
# (a script runs alone).
# KEYS[1]: the limiter's hash.
# ARGV: op ('reserve' | 'settle' | 'strike'), now ('' = Redis TIME), requests_per_minute,
#       tokens_per_minute, burst_s, the 7 numbers of TUNING, then per op:
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
            return acquire_loop(
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
        state = GcraState()
        for key, value in self._client.hgetall(self.key).items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            setattr(state, name, int(float(value)) if name == "strikes" else float(value))
        return state

    def _run(self, op: str, *args: float | int | str) -> tuple[float, float, float]:
        now = "" if self._clock is None else repr(self._clock())
        limits = (self.limits.requests_per_minute, self.limits.tokens_per_minute, self.limits.burst_s)
        result, now_s, granted = self._script(keys=[self.key], args=[op, now, *limits, *TUNING, *args])
        return float(result), float(now_s), float(granted)
