"""Group commit: work that threads of one process submit at the same time, done in one go.

The first thread to submit becomes the leader: it takes everything queued (its own item and what
other threads queued meanwhile, up to `max_items`) and runs `commit` on the lot, once, while
later arrivals queue for the next group. Each submitter gets its own item's result, or the
exception `commit` raised. A thread alone is a group of one: no waiting, no extra cost.

The Celery threads pool runs up to `worker_concurrency` ingest tasks at once; their messages so
share one SQL transaction (worker/intake.py) instead of one each.

While items stream in (the previous one arrived less than STREAM_GAP_S before), the leader first
waits up to `gather_s` for the group to reach `gather` items: one event per message arrives one
message at a time, so without the wait a group is mostly its leader alone (0.9 commits per
event); with it, two to four messages share a transaction. A lone item at light load never
waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Entry(Generic[T, R]):
    item: T
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    STREAM_GAP_S = 0.02

    def __init__(self, max_items: int = 64, *, gather: int = 1, gather_s: float = 0.0) -> None:
        self.max_items = max_items
        self.gather = min(gather, max_items)
        self.gather_s = gather_s
        self._changed = threading.Condition()
        self._queue: list[_Entry[T, R]] = []
        self._committing = False
        self._last_arrival = float("-inf")

    def submit(self, item: T, commit: Callable[[Sequence[T]], Sequence[R]]) -> R:
        """`item`'s result from `commit(items)` (one result per item, in order), run on a group
        that includes it; re-raises what that run raised. Groups go first come, first served."""
        entry: _Entry[T, R] = _Entry(item)
        with self._changed:
            now = time.monotonic()
            streaming, self._last_arrival = now - self._last_arrival < self.STREAM_GAP_S, now
            self._queue.append(entry)
            if self._committing:
                self._changed.notify_all()  # a leader may be gathering
            while not entry.done:
                if self._committing:
                    self._changed.wait()
                    continue
                self._committing = True
                if streaming:
                    self._gather(now + self.gather_s)
                group, self._queue = self._queue[: self.max_items], self._queue[self.max_items :]
                self._changed.release()
                try:
                    _run(group, commit)
                finally:
                    self._changed.acquire()
                    for member in group:
                        member.done = True
                    self._committing = False
                    self._changed.notify_all()
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]  # set with done, error unset

    def _gather(self, deadline: float) -> None:
        """Wait (holding the lead) until `gather` items are queued or `deadline` passes."""
        while len(self._queue) < self.gather and (left := deadline - time.monotonic()) > 0:
            self._changed.wait(left)


def _run(group: list[_Entry[T, R]], commit: Callable[[Sequence[T]], Sequence[R]]) -> None:
    try:
        results = commit([entry.item for entry in group])
        for entry, result in zip(group, results, strict=True):
            entry.result = result
    except BaseException as exc:  # every member learns it; each decides what to do
        for entry in group:
            entry.error = exc
