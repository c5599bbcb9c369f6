"""Rate windows, per model as the provider's limits are per account and model.

rpm/tpm use a sliding 60 s window, rps/tps a 1 s window answered as burst protection. Requests
rejected before the windows (401/400/404) do not count; admitted requests count even if an
injected fault follows.
"""

from __future__ import annotations

from collections import deque

from api.emulator.config import EmulatorConfig
from api.emulator.errors import ProviderError, allocation_quota, burst_rate, rate_quota


class Window:
    """Requests and tokens admitted in the last `span_s` seconds."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.events: deque[tuple[float, int]] = deque()
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.span_s:
            self.tokens -= self.events.popleft()[1]
            self.requests -= 1

    def add(self, now: float, tokens: int) -> None:
        self.events.append((now, tokens))
        self.requests += 1
        self.tokens += tokens


class RateWindows:
    """A minute and a second window for every model; not thread-safe (the caller locks)."""

    def __init__(self) -> None:
        self.by_model: dict[str, tuple[Window, Window]] = {}

    def admit(self, config: EmulatorConfig, model: str, tokens: int, now: float) -> ProviderError | None:
        """Check and record one request at monotonic time `now`; the error if it is over a limit."""
        minute, second = self.by_model.setdefault(model, (Window(60.0), Window(1.0)))
        minute.expire(now)
        second.expire(now)
        if config.rpm is not None and minute.requests + 1 > config.rpm:
            return rate_quota()
        if config.tpm is not None and minute.tokens + tokens > config.tpm:
            return allocation_quota()
        if (config.rps is not None and second.requests + 1 > config.rps) or (
            config.tps is not None and second.tokens + tokens > config.tps
        ):
            return burst_rate()
        minute.add(now, tokens)
        second.add(now, tokens)
        return None
