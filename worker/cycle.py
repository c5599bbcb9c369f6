"""What a cycle works on (Work), what it did (Cycle), and what becomes of a document it could
not finish: retried after a backoff, or given up on (dead), each in its own transaction."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from worker import chunking
from worker.errors import GiveUp, SidecarError
from worker.holdback import HeldBack
from worker.runtime import Runtime
from worker.sql import cache, documents

log = logging.getLogger("worker.pipeline")  # these lines were the pipeline's, and keep its name


@dataclass
class Cycle:
    """What one pass did; `idle` means nothing was pending."""

    claimed: int = 0
    indexed: int = 0
    deleted: int = 0
    requests: int = 0
    rows: int = 0
    held_back: int = 0
    failed: int = 0
    dead: int = 0
    idle: bool = False
    paused: str | None = None  # why embedding is paused for every process
    waited_s: float = 0.0  # spent waiting for the provider's answers (worker/loops.py)


@dataclass
class Work:
    """Upserts of this cycle, their chunks and who needs which vector."""

    docs: list[documents.Claimed]
    held: HeldBack
    probing: bool = False  # a provider pause expired: the first success clears it
    chunks: dict[int, list[chunking.Chunk]] = field(default_factory=dict)
    keys: dict[int, list[str]] = field(default_factory=dict)
    users: dict[str, list[tuple[documents.Claimed, chunking.Chunk]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    vectors: dict[str, cache.Embedded] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)  # keys paid for before this cycle
    errors: dict[int, SidecarError] = field(default_factory=dict)


def failed(rt: Runtime, doc: documents.Claimed, error: SidecarError, cycle: Cycle) -> None:
    if isinstance(error, GiveUp) and not error.pauses_everyone:
        give_up(rt, doc, f"provider rejected the text: {error}", cycle)
    else:
        retry(rt, doc, error, cycle)


def give_up(rt: Runtime, doc: documents.Claimed, reason: str, cycle: Cycle) -> None:
    with rt.sessions.begin() as session:
        documents.give_up(session, doc, owner=rt.owner, error=reason)
    cycle.dead += 1
    log.warning("document.dead id=%d reason=%s", doc.id, reason.split(":")[0])


def retry(rt: Runtime, doc: documents.Claimed, error: SidecarError, cycle: Cycle) -> None:
    """Back to pending after a backoff; only failures that may be the document's own count."""
    delay = 60.0 if error.pauses_everyone else min(60.0, 0.5 * 2 ** min(doc.attempts, 7))
    retry_after = getattr(error, "retry_after_s", None) or 0.0
    with rt.sessions.begin() as session:
        outcome = documents.fail(
            session,
            doc,
            owner=rt.owner,
            error=f"{type(error).__name__}: {error}",
            retry_after_s=max(delay, retry_after),
            max_attempts=rt.settings.max_attempts if error.counts_attempt else None,
        )
    cycle.failed += 1
    cycle.dead += outcome == "dead"
