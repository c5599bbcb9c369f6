"""Rows held back for a fuller batch (worker/pipeline.py): when each document first waited, and
whether lone events are streaming in (then a cycle lingers a moment before it claims)."""

from __future__ import annotations

import time


class HeldBack:
    """When each document was first handed back to wait for a full batch; one per embedding
    loop (its threads share it), so the wait is measured across cycles."""

    LIMIT = 100_000  # documents finished elsewhere are never forgotten here: start afresh past this
    LINGER_MAX_S = 0.5

    def __init__(self) -> None:
        self._since: dict[int, float] = {}
        self._small = 0  # consecutive cycles that had work, but less than `full` documents

    def noted(self, claimed: int, *, full: int) -> None:
        """Count this cycle: small (some documents, fewer than `full`), or not (idle, or a backlog)."""
        self._small = self._small + 1 if 0 < claimed < full else 0

    def linger(self, up_to_s: float) -> None:
        """Wait a moment before claiming after two small cycles in a row: lone events streaming
        in, so that a request carries more than two or three rows (each cycle's claim, ledger and
        settle transactions are then shared by more documents). Never after an idle cycle or
        under a backlog: a lone event at light load is claimed at once."""
        if self._small >= 2 and up_to_s > 0:
            time.sleep(min(self.LINGER_MAX_S, up_to_s))

    def waited_s(self, doc_ids: list[int]) -> float:
        """How long the longest-waiting of these documents has been held back (0 the first time)."""
        now = time.monotonic()
        if len(self._since) > self.LIMIT:
            self._since.clear()
        return max(now - self._since.setdefault(doc_id, now) for doc_id in doc_ids)

    def done(self, doc_id: int) -> None:
        self._since.pop(doc_id, None)
