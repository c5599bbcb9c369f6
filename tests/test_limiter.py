"""The rate limiter: one contract for LocalRateLimiter and RedisRateLimiter, on an injected clock.

Redis-backed peers on one key stand for separate processes; one test uses real processes.
The pure functions and the Lua script are checked against each other operation by operation.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import uuid
from collections.abc import Callable

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import ProviderThrottled, RetryLater
from worker.limiter.base import BACKOFF_BASE_S, BACKOFF_MAX_S, Limits, Permit, RateLimiter
from worker.limiter.local import LocalRateLimiter
from worker.limiter.redis import RedisRateLimiter

LIMITS = Limits(requests_per_minute=600, tokens_per_minute=300_000)  # 10 requests/s, 5000 tokens/s
EPS = 1e-9  # float sums of intervals land a hair either side of a whole second


class FakeClock:
    """Simulated time: `sleep` advances it, nothing waits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


MakePeers = Callable[..., list[RateLimiter]]


@pytest.fixture(params=["local", "redis"])
def make_peers(request) -> MakePeers:
    """`make_peers(limits, clock, n=1, sleep=clock.sleep)`: n handles on one limiter (Redis: n
    instances, one key)."""
    key = f"test:limiter:{uuid.uuid4().hex}"

    def make(
        limits: Limits, clock: FakeClock, n: int = 1, seed: int = 0, sleep: Callable | None = None
    ) -> list[RateLimiter]:
        sleep = sleep or clock.sleep
        if request.param == "local":
            return [LocalRateLimiter(limits, clock=clock, sleep=sleep, seed=seed)] * n
        client = request.getfixturevalue("redis_client")
        return [
            RedisRateLimiter(client, limits, key=key, clock=clock, sleep=sleep, seed=seed + i)
            for i in range(n)
        ]

    return make


def refused(limiter: RateLimiter, tokens: int) -> float:
    """The wait the limiter asks for when `tokens` cannot go now (fails if they can)."""
    with pytest.raises(ProviderThrottled) as info:
        limiter.acquire(tokens, timeout_s=0)
    assert info.value.retry_after_s > 0
    return info.value.retry_after_s


def grants(limiter: RateLimiter, clock: FakeClock, sizes: Callable[[], int], seconds: float):
    """Acquire back to back for `seconds` of simulated time: [(granted_at, tokens)]."""
    out, end = [], clock.now + seconds
    while clock.now < end:
        tokens = sizes()
        limiter.acquire(tokens, timeout_s=60)
        out.append((clock.now, tokens))
    return [(t, n) for t, n in out if t < end]


# --- the contract ---------------------------------------------------------------------------


def test_a_request_that_fits_rpm_but_not_tpm_debits_neither(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(Limits(requests_per_minute=60, tokens_per_minute=6_000), clock)  # 1/s, 100/s
    lim.acquire(150, timeout_s=0)  # request slot free again at +1.0, tokens at +1.5
    clock.now += 1.0
    assert refused(lim, 10) == pytest.approx(0.5)  # the request fits, the tokens do not
    clock.now += 0.5
    lim.acquire(10, timeout_s=0)  # a request slot debited by the refusal would block until +2.0


def test_a_request_that_fits_tpm_but_not_rpm_debits_neither(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(Limits(requests_per_minute=60, tokens_per_minute=6_000), clock)
    lim.acquire(50, timeout_s=0)  # request slot free at +1.0, tokens at +0.5
    clock.now += 0.5
    assert refused(lim, 60) == pytest.approx(0.5)  # the tokens fit, the request does not
    clock.now += 0.5
    lim.acquire(60, timeout_s=0)  # 60 tokens debited by the refusal would block until +1.1


@pytest.mark.parametrize(
    ("tokens", "per_second"),
    [(400, 10.0), (1000, 5.0)],  # bound by requests (4000 tokens/s), bound by tokens
    ids=["request-bound", "token-bound"],
)
def test_grants_are_spread_over_the_second_at_the_limit(make_peers, tokens, per_second):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    out = grants(lim, clock, lambda: tokens, seconds=60)
    for start, _ in out:
        window = [n for t, n in out if start <= t < start + 1 - EPS]
        assert len(window) <= 10
        assert sum(window) <= 5000
    assert len(out) / 60 == pytest.approx(per_second, rel=0.01)


def test_mixed_sizes_wait_for_the_tokens_before_them(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    rng = random.Random(7)
    out = grants(lim, clock, lambda: rng.randint(600, 1400), seconds=60)
    for i, (start, _) in enumerate(out):
        window = [n for t, n in out[i:] if t < start + 1 - EPS]
        assert sum(window[:-1]) < 5000  # all but the last were paid for within the second
        assert len(window) <= 10
    assert sum(n for _, n in out) / 60 == pytest.approx(5000, rel=0.01)


def test_peers_share_one_budget(make_peers):
    clock = FakeClock()
    a, b = make_peers(LIMITS, clock, n=2)
    times = []
    for _ in range(50):
        for lim in (a, b):
            lim.acquire(100, timeout_s=60)
            times.append(clock.now)
    assert times[-1] - times[0] == pytest.approx(9.9)  # 100 requests at 10/s, not 20/s


def test_settle_refunds_an_over_estimate(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    permit = lim.acquire(5000, timeout_s=0)  # a second of tokens
    clock.now += 0.2
    assert refused(lim, 1000) == pytest.approx(0.8)
    lim.settle(permit, 1000)  # 4000 tokens come back
    lim.acquire(1000, timeout_s=0)


def test_settle_after_a_failure_refunds_the_tokens_but_not_the_request(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(Limits(requests_per_minute=60, tokens_per_minute=300_000), clock)
    permit = lim.acquire(5000, timeout_s=0)
    lim.settle(permit, 0)
    assert refused(lim, 1) == pytest.approx(1.0)  # the request slot stays used


def test_settle_charges_an_under_estimate_to_the_next_caller(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    permit = lim.acquire(1000, timeout_s=0)  # tokens free at +0.2
    lim.settle(permit, 3000)  # ...now at +0.6
    clock.now += 0.2
    assert refused(lim, 1000) == pytest.approx(0.4)


def test_a_request_larger_than_a_second_of_tokens_goes_when_the_bucket_is_empty(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    start = clock.now
    lim.acquire(20_000, timeout_s=0)  # four seconds of tokens
    assert refused(lim, 1) == pytest.approx(4.0)
    lim.acquire(1, timeout_s=10)  # blocks on the fake sleep
    assert clock.now == pytest.approx(start + 4.0)


def test_acquire_gives_up_after_its_timeout(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    lim.acquire(20_000, timeout_s=0)
    with pytest.raises(ProviderThrottled):
        lim.acquire(1, timeout_s=3.0)
    assert clock.now < 1000.0 + 3.0  # it did not sleep past its deadline


def test_a_429_pauses_every_user(make_peers):
    clock = FakeClock()
    a, b = make_peers(LIMITS, clock, n=2)
    start = clock.now
    pause = a.throttled()
    assert BACKOFF_BASE_S / 2 <= pause <= BACKOFF_BASE_S
    assert refused(b, 1) == pytest.approx(pause)
    b.acquire(1, timeout_s=5)
    assert clock.now == pytest.approx(start + pause)


def test_retry_after_is_honoured(make_peers):
    clock = FakeClock()
    a, b = make_peers(LIMITS, clock, n=2)
    assert a.throttled(retry_after_s=7.0) == 7.0
    assert refused(b, 1) == pytest.approx(7.0)


def test_repeated_429s_grow_the_pause_up_to_the_cap(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    pauses = []
    for strikes in range(1, 9):
        pause = lim.throttled()
        backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (strikes - 1))
        assert backoff / 2 <= pause <= backoff
        pauses.append(pause)
        lim.acquire(1, timeout_s=60)  # wait the cooldown out, then the next call is throttled again
    assert pauses[:6] == sorted(pauses[:6])  # each step at least the previous one, until the cap
    assert min(pauses[6:]) >= BACKOFF_MAX_S / 2


def test_a_clean_minute_forgives_the_strikes(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    for _ in range(4):
        lim.throttled()
        lim.acquire(1, timeout_s=60)
    clock.now += 60
    assert lim.throttled() <= BACKOFF_BASE_S  # back to the first step


def test_429s_of_requests_already_in_flight_count_once(make_peers):
    clock = FakeClock()
    a, b = make_peers(LIMITS, clock, n=2)
    in_flight = [a.acquire(1, timeout_s=60) for _ in range(3)]
    clock.now += 0.3  # the first answer arrives
    first = a.throttled(permit=in_flight[0])
    assert b.throttled(permit=in_flight[1]) == pytest.approx(first)  # during the cooldown: an echo
    clock.now += 2.0  # the cooldown is over, a slow request sent before it answers 429 too
    assert b.throttled(permit=in_flight[2]) == 0.0
    fresh = a.acquire(1, timeout_s=0)
    assert BACKOFF_BASE_S <= b.throttled(permit=fresh) <= 2 * BACKOFF_BASE_S  # the second strike


def rate(lim: RateLimiter, clock: FakeClock, seconds: float = 10.0) -> float:
    lim.acquire(1, timeout_s=600)  # start from a settled bucket
    return len(grants(lim, clock, lambda: 1, seconds)) / seconds


def test_a_429_halves_the_rate_and_clean_windows_bring_it_back(make_peers):
    clock = FakeClock()
    a, b = make_peers(LIMITS, clock, n=2)
    assert rate(b, clock) == pytest.approx(10, rel=0.02)
    a.throttled()
    b.acquire(1, timeout_s=60)  # the cooldown is over...
    a.throttled()  # ...and a second strike comes within 5 s of the cut: no second cut
    assert rate(b, clock) == pytest.approx(5, rel=0.02)
    clock.now += 60  # a clean minute since the last strike (the measuring took about 10 s)
    assert rate(b, clock) == pytest.approx(5.5, rel=0.02)
    clock.now += 600
    assert rate(b, clock) == pytest.approx(10, rel=0.02)


def test_the_rate_never_falls_below_the_floor(make_peers):
    clock = FakeClock()
    (lim,) = make_peers(LIMITS, clock)
    for _ in range(6):  # 0.5, 0.25, 0.125, then the floor
        lim.throttled()
        clock.now += 31
    assert rate(lim, clock, seconds=30) == pytest.approx(1, rel=0.05)


# --- Redis only ------------------------------------------------------------------------------


def _strike_from_another_process(url: str, key: str) -> None:
    client = redis.Redis.from_url(url)
    RedisRateLimiter(client, LIMITS, key=key).throttled(retry_after_s=30.0)
    client.close()


def test_a_cooldown_set_in_another_process_blocks_this_one(redis_client, redis_url):
    key = f"test:limiter:{uuid.uuid4().hex}"
    here = RedisRateLimiter(redis_client, LIMITS, key=key)  # Redis TIME: one clock for both
    here.acquire(1, timeout_s=0)
    process = multiprocessing.get_context("spawn").Process(
        target=_strike_from_another_process, args=(redis_url, key)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert 25.0 < refused(here, 1) <= 30.0


def test_the_shared_state_expires_when_idle(redis_client):
    key = f"test:limiter:{uuid.uuid4().hex}"
    clock = FakeClock()
    lim = RedisRateLimiter(redis_client, LIMITS, key=key, clock=clock, sleep=clock.sleep)
    lim.acquire(20_000, timeout_s=0)
    assert 60_000 < redis_client.pttl(key) <= 65_000  # the 4 s of tokens, then a minute
    lim.throttled()  # the halved rate needs ten clean minutes to recover
    assert redis_client.pttl(key) > 600_000


def test_redis_time_is_the_default_clock(redis_client):
    lim = RedisRateLimiter(redis_client, LIMITS, key=f"test:limiter:{uuid.uuid4().hex}")
    seconds, micros = redis_client.time()
    permit = lim.acquire(10, timeout_s=0)
    assert abs(permit.granted_at - (seconds + micros / 1e6)) < 5.0


def test_redis_down_is_retry_later():
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    lim = RedisRateLimiter(client, LIMITS, key="test:limiter:down")
    with pytest.raises(RetryLater):
        lim.acquire(1, timeout_s=0)
    lim.settle(Permit(tokens=1, granted_at=0.0), 1)  # best effort: logs, does not raise
    assert lim.throttled(retry_after_s=2.0) == 2.0


# --- the pure functions and the Lua script agree ---------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0.0, 90.0)),
        st.tuples(st.just("acquire"), st.integers(1, 30_000)),
        st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 30_000)),
        st.tuples(
            st.just("throttled"),
            st.one_of(st.none(), st.floats(0.0, 40.0)),
            st.one_of(st.none(), st.integers(0, 30)),
        ),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=operations,
    limits=st.sampled_from([LIMITS, Limits(60, 6_000), Limits(1_800, 1_200_000, burst_s=0.5)]),
)
def test_local_and_redis_make_the_same_decisions(redis_client, ops, limits):
    clock = FakeClock()
    local = LocalRateLimiter(limits, clock=clock, sleep=clock.sleep, seed=1)
    shared = RedisRateLimiter(
        redis_client,
        limits,
        key=f"test:limiter:{uuid.uuid4().hex}",
        clock=clock,
        sleep=clock.sleep,
        seed=1,
    )

    def outcome(lim: RateLimiter, op: tuple, permits: list[Permit]):
        kind = op[0]
        if kind == "acquire":
            try:
                permit = lim.acquire(op[1], timeout_s=0)
            except ProviderThrottled as exc:
                return ("wait", exc.retry_after_s)
            permits.append(permit)
            return ("granted", permit)

        def pick(i):
            return permits[i % len(permits)] if permits and i is not None else None

        if kind == "settle":
            permit = pick(op[1])
            return None if permit is None else lim.settle(permit, op[2])
        return lim.throttled(op[1], permit=pick(op[2]))

    local_permits: list[Permit] = []
    shared_permits: list[Permit] = []
    for op in ops:
        if op[0] == "advance":
            clock.now += op[1]
            continue
        assert outcome(local, op, local_permits) == outcome(shared, op, shared_permits), op
        assert local.state() == shared.state(), op


def test_booking_ahead_keeps_every_slot_when_callers_wake_late(make_peers):
    """With schedule_ahead_s a caller that must wait books its exact turn: a caller that wakes
    late (here 30 ms after each sleep) no longer pushes every later slot back."""
    limits = Limits(600, 300_000, schedule_ahead_s=1.0)
    clock = FakeClock()

    def late_sleep(seconds: float) -> None:
        clock.sleep(seconds + 0.03)

    (lim,) = make_peers(limits, clock, sleep=late_sleep)
    granted = [lim.acquire(10, timeout_s=5).granted_at for _ in range(601)]
    # Slots stay 100 ms apart, so 600 of them take exactly 60 s of limiter time...
    assert granted[-1] - granted[0] == pytest.approx(60.0, abs=1e-3)
    assert all(b - a == pytest.approx(0.1, abs=1e-3) for a, b in itertools.pairwise(granted))


def test_booking_is_the_same_in_both_implementations(redis_client):
    clocks = [FakeClock(), FakeClock()]
    limits = Limits(600, 30_000, schedule_ahead_s=1.0)
    peers = [
        LocalRateLimiter(limits, clock=clocks[0], sleep=clocks[0].sleep, seed=1),
        RedisRateLimiter(
            redis_client,
            limits,
            key=f"test:limiter:{uuid.uuid4().hex}",
            clock=clocks[1],
            sleep=clocks[1].sleep,
            seed=1,
        ),
    ]
    rng = random.Random(7)
    for _ in range(200):
        tokens, gap = rng.randint(1, 800), rng.choice([0.0, 0.0, 0.05, 0.3])
        results = []
        for clock, lim in zip(clocks, peers, strict=True):
            clock.now += gap
            try:
                results.append(round(lim.acquire(tokens, timeout_s=0.5).granted_at, 6))
            except ProviderThrottled as exc:
                results.append(("wait", round(exc.retry_after_s, 6)))
        assert results[0] == results[1]
        assert clocks[0].now == pytest.approx(clocks[1].now)
