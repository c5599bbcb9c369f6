"""How many of a process's embedding loops claim work at once (worker/service.py starts them).

More loops overlap more provider calls, which pays while the provider's latency bounds a cycle
(Singapore's v3 ceiling, 1,000 rows a second behind 50 ms answers, wants five or more), and
costs while the process computes: the loops then only queue for the GIL, claim smaller bites
and commit more often (one loop indexed 451 events/s at 2.32 CPU-s per 1,000 where three
indexed 374 at 2.94, one event per message, no provider latency). So the first loop always
works, and one more joins each time a full claim (a backlog) met a process that spent at least
`GROW_WAIT_SHARE` of its cycles' time waiting for the provider's answers while its CPU had room;
one leaves at a claim that was not full, or when the process's CPU is spent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

GROW_WAIT_SHARE = 0.15  # of the cycles' wall time, spent waiting for the provider's answers
BUSY_CPU_SHARE = 0.8  # of one core, used by the process (all its threads): no loop joins, one leaves
CHANGE_EVERY_S = 0.1  # the least time between two loops joining


class LoopScale:
    """The number of loops working now (`active`, 1 to `most`) and the gate the others wait at."""

    def __init__(
        self,
        most: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.most = max(1, most)
        self.active = 1
        self._clock, self._cpu = clock, cpu
        self._changed = threading.Condition()
        self._restart(clock(), cpu())

    def admitted(self, index: int, stop: threading.Event, timeout_s: float) -> bool:
        """Wait until loop `index` may work (True) or `timeout_s` passed or `stop` was set (False);
        the first may work at once unless stopped."""
        with self._changed:
            self._changed.wait_for(lambda: index < self.active or stop.is_set(), timeout_s)
            return index < self.active and not stop.is_set()

    def release(self) -> None:
        """Wake every waiting loop (at stop)."""
        with self._changed:
            self._changed.notify_all()

    def noted(self, *, full: bool, wall_s: float, waited_s: float) -> None:
        """A cycle ended: it claimed as much as it could (`full`), took `wall_s`, and waited
        `waited_s` of that for the provider's answers."""
        with self._changed:
            now, used = self._clock(), self._cpu()
            if not full:  # and what was measured so far no longer says anything of a backlog
                self._restart(now, used)
                self._set(self.active - 1, "no backlog")
                return
            self._wall_s += wall_s
            self._waited_s += waited_s
            span = now - self._since[0]
            if span < CHANGE_EVERY_S:
                return
            cpu_share = (used - self._since[1]) / span
            wait_share = self._waited_s / self._wall_s if self._wall_s > 0 else 0.0
            self._restart(now, used)
            if cpu_share >= BUSY_CPU_SHARE:
                self._set(self.active - 1, f"cpu {cpu_share:.2f}")
            elif wait_share >= GROW_WAIT_SHARE:
                self._set(self.active + 1, f"waiting {wait_share:.2f}")

    def _restart(self, now: float, used: float) -> None:
        """Measure afresh from this moment (wall clock `now`, process CPU `used`)."""
        self._since = (now, used)
        self._waited_s = 0.0
        self._wall_s = 0.0

    def _set(self, active: int, why: str) -> None:
        active = min(self.most, max(1, active))
        if active == self.active:
            return
        log.debug("embed.loops active=%d was=%d why=%s", active, self.active, why)
        self.active = active
        self._changed.notify_all()
