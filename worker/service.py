"""The embedding loop: threads in each worker process that drain pending work from SQL.

Ingest tasks only record desired state and return, so a provider cooldown never holds a
broker message; these threads claim work, wait on the limiter and write results.
"""

from __future__ import annotations

import logging
import threading
import time

from worker import pipeline, reconciler
from worker.batch.lane import BatchLane
from worker.loops import LoopScale
from worker.runtime import Runtime
from worker.sql import backlog_models
from worker.sql.models import utcnow

log = logging.getLogger(__name__)


class EmbedService:
    """The embedding threads (and the reconciler's) of one process, over one Runtime."""

    IDLE_WAIT_S = 1.0

    def __init__(self, rt: Runtime, *, threads: int = 2, reconcile: bool = True) -> None:
        self.rt = rt
        self.held = pipeline.HeldBack()  # shared by the threads: a partial batch's wait spans cycles
        self._stop = threading.Event()
        self._activity = threading.Lock()  # guards the three below
        self._running = 0  # cycles in flight
        self._last_work = time.monotonic()  # when a cycle last had work
        self._sampled_minute: object = None  # the UTC minute this process last sampled the backlog in
        self.scale = LoopScale(threads)  # how many of the loops work now (worker/loops.py)
        self._threads = [  # the first watches for work; the others sleep while there is none
            threading.Thread(target=self._loop, args=(i,), name=f"sidecar-embed-{i}", daemon=True)
            for i in range(threads)
        ]
        if reconcile and rt.settings.reconcile_interval_s > 0:
            self._threads.append(
                threading.Thread(target=self._reconcile_loop, name="sidecar-reconcile", daemon=True)
            )

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._batch_lane = BatchLane(self.rt)  # documents of lane "batch" (worker/batch/)
        self._batch_lane.start()
        embedding = sum(t.name.startswith("sidecar-embed-") for t in self._threads)
        log.info("embed.started threads=%d reconciler=%s", embedding, len(self._threads) > embedding)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if getattr(self, "_batch_lane", None) is not None:
            self._batch_lane.stop(timeout_s)
        self.rt.wake.set()
        self.scale.release()
        for thread in self._threads:
            thread.join(timeout_s)

    def _loop(self, index: int) -> None:
        """Cycle after cycle, while `scale` lets this loop work (the first always). Idle, the
        watching (first) loop looks again every `poll_interval_s`, the others every IDLE_WAIT_S
        (so idle polling costs one loop's, however many there are); an ingest in this process
        wakes the working ones, and so does a cycle that found a backlog."""
        watching = index == 0
        failures = 0
        while not self._stop.is_set():
            if not self.scale.admitted(index, self._stop, self.IDLE_WAIT_S):
                continue
            started = time.monotonic()
            cycle = self._run_cycle(failures)
            if cycle is None:  # a bug or an outage must not end the loop; the lease recovers the work
                failures += 1
                self._stop.wait(min(30.0, 0.5 * 2**failures))
                continue
            failures = 0
            if not cycle.paused:
                full = cycle.claimed >= self.rt.settings.claim_docs
                self.scale.noted(full=full, wall_s=time.monotonic() - started, waited_s=cycle.waited_s)
            self._sample_backlog()
            if cycle.idle and self._idle_long_enough():
                self._optimize_store()
            if cycle.paused:  # nothing to do until the pause ends (or a probe is due)
                self._stop.wait(1.0)
            elif cycle.idle or (cycle.held_back and not cycle.requests):
                self.rt.wake.wait(self.rt.settings.poll_interval_s if watching else self.IDLE_WAIT_S)
                self.rt.wake.clear()
            elif cycle.claimed >= self.rt.settings.claim_docs:  # a backlog: every loop to work
                self.rt.wake.set()

    def _run_cycle(self, failures: int) -> pipeline.Cycle | None:
        """One cycle, counted as in flight while it runs; None (logged) if it raised."""
        with self._activity:
            self._running += 1
        cycle = None
        try:
            cycle = pipeline.run_cycle(self.rt, self.held)
        except Exception:
            log.exception("embed.cycle_failed consecutive=%d", failures + 1)
            return None
        finally:
            with self._activity:
                self._running -= 1
                if cycle is not None and not cycle.idle:
                    self._last_work = time.monotonic()
        return cycle

    def _sample_backlog(self) -> None:
        """The backlog into `backlog_samples` (worker/sql/backlog_models.py) when the minute changed
        in this process: one insert that ignores a minute another process sampled already. A
        failure is logged (its type only) and skipped; the next minute tries again."""
        minute = backlog_models.minute_of(utcnow())
        with self._activity:
            if minute == self._sampled_minute:
                return
            self._sampled_minute = minute
        try:
            with self.rt.sessions.begin() as s:
                backlog_models.record_sample(s, minute)
        except Exception as exc:  # history only: never stops the loop
            log.warning("backlog.sample_failed error=%s", type(exc).__name__)

    def _idle_long_enough(self) -> bool:
        """No cycle in flight and none had work for edge_optimize_idle_s."""
        with self._activity:
            quiet = time.monotonic() - self._last_work
            return self._running == 0 and quiet >= self.rt.settings.edge_optimize_idle_s

    def _optimize_store(self) -> None:
        """Store housekeeping after a bulk load (Edge builds its index), off the hot path."""
        try:
            if self.rt.store.optimize_if_due():
                log.info("store.optimized")
        except Exception:  # housekeeping: the next idle spell tries again
            log.exception("store.optimize_failed")

    def _reconcile_loop(self) -> None:
        """Once soon after start (repairs what a crash left), then every reconcile_interval_s."""
        delay = min(5.0, self.rt.settings.reconcile_interval_s)
        while not self._stop.wait(delay):
            try:
                reconciler.reconcile(self.rt)
            except Exception:  # the next round tries again
                log.exception("reconcile.failed")
            delay = self.rt.settings.reconcile_interval_s
