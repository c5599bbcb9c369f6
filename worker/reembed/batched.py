"""A re-embed's backfill through the batch lane (`sidecar reembed --lane batch`), at half price.

The backfill's text is paid for by batch jobs, and the follower does the rest exactly as on the
real-time path (worker/reembed/follow.py): once the jobs are done, every vector it needs is in
the embedding cache, so it writes the new collection without a provider call; validation and the
switch are unchanged (worker/reembed/control.py).

One round: while the migration is `backfilling` and has no batch job yet, one transaction packs
every chunk of the documents due on its `to` side that the cache lacks into jobs of the new model
(at most `batch_max_lines` lines each, one line per distinct text), each with its ledger row
(`lane`/`api` batch, `migration` = the new physical collection), after the budget check at the
batch price. The jobs serve no document lease: the documents stay as they are, live changes go
on. The batch lane moves the jobs along (worker/batch/lane.py: a worker's lane thread, or
`sidecar reembed` itself); their import fills the cache. Until every job of the round is done the
follower waits; then it follows: what changed meanwhile, and lines that failed or expired, are
embedded the real-time way (booked under the migration too), so a migration never waits for a
second completion window.
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import chunking
from worker.batch import packing
from worker.batch.packing import Lines
from worker.ledger import budget, calls
from worker.reembed import parts
from worker.reembed.follow import due_filter
from worker.runtime import Runtime
from worker.sql import cache
from worker.sql.batch_models import BatchJob, BatchLine
from worker.sql.models import Document, ProviderRequest
from worker.sql.reembed_models import Migration

log = logging.getLogger(__name__)
PAGE = 1000  # due documents read per query while packing
RUNNING = ("packed", "uploaded", "submitted", "imported")


def jobs(rt: Runtime, mig: Migration) -> dict[str, str]:
    """The migration's batch jobs: id → state."""
    with rt.sessions() as session:
        return jobs_in(session, mig.to_physical)


def jobs_in(session: Session, to_physical: str) -> dict[str, str]:
    """The batch jobs of the migration to `to_physical` (their ledger rows name it): id → state."""
    rows = session.execute(
        sa.select(BatchJob.id, BatchJob.state)
        .join(ProviderRequest, ProviderRequest.id == BatchJob.id)
        .where(ProviderRequest.migration == to_physical, ProviderRequest.api == "batch")
    ).all()
    return {job_id: state for job_id, state in rows}


def backfill(rt: Runtime, mig: Migration) -> bool | None:
    """The batch round of a migration: True when jobs were packed now, False while its jobs run,
    None when the follower goes on (the round is over, nothing was left to pay for, or the
    migration is not on the batch lane)."""
    if mig.lane != "batch" or mig.state != "backfilling":
        return None
    found = jobs(rt, mig)
    if any(state in RUNNING for state in found.values()):
        return False
    if found:
        return None  # the round is over: the follower takes the rest from the cache
    with rt.sessions.begin() as session:
        packed = pack(rt, session, mig)
    if packed:
        log.info("reembed.batch_packed migration=%d jobs=%d", mig.id, len(packed))
    return bool(packed) or None


def pack(rt: Runtime, session: Session, mig: Migration) -> list[str]:
    """Write the round's jobs (ids) over every due document's uncached text, in one transaction
    (a crash leaves either the whole round or nothing). BudgetExceeded writes nothing."""
    srt = parts.model_runtime(rt, mig.to_model, mig.to_dimensions)
    limit = rt.settings.batch_max_lines
    done: list[Lines] = []
    job = Lines()
    seen: set[str] = set()
    for docs in _due_pages(session, mig):
        planned = []
        for doc_id, version, text in docs:
            chunks = chunking.split_text(
                text or "", max_tokens=srt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
            )
            planned.append((doc_id, version, chunks, [srt.cache_key(c.content_hash) for c in chunks]))
        paid = set(cache.get_many(session, {k for *_rest, keys in planned for k in keys}))
        for doc_id, version, chunks, keys in planned:
            for chunk, key in zip(chunks, keys, strict=True):
                if key in paid:
                    continue
                if key not in seen:
                    if len(job.by_key) >= limit:
                        done.append(job)
                        job = Lines()
                    seen.add(key)
                    job.by_key[key] = _line(len(job.by_key), key, chunk)
                    job.tokens += chunk.tokens
                item = calls.ItemRef(doc_id, version, chunk.index, chunk.content_hash, chunk.tokens)
                job.items.append(item)
    if job.by_key:
        done.append(job)
    total = sum(j.tokens for j in done)
    if srt.budget_check is not None and total:
        budget.admit(
            session,
            collections={mig.collection},
            est_cost_nano=srt.spec.cost_nano_cny(total, batch=True),
            settings=srt.settings,
            lock=True,
        )
    return [_write(srt, session, mig, j) for j in done]


def _due_pages(session: Session, mig: Migration) -> list[list[tuple[int, int, str | None]]]:
    """The documents due on the `to` side (settled, live), a page at a time, by id."""
    joined, where = due_filter(mig.id, "to", mig.collection)
    pages: list[list[tuple[int, int, str | None]]] = []
    after = 0
    while True:
        rows = session.execute(
            sa.select(Document.id, Document.version, Document.text)
            .select_from(joined)
            .where(where, Document.status == "indexed", Document.id > after)
            .order_by(Document.id)
            .limit(PAGE)
        ).all()
        if not rows:
            return pages
        pages.append([(r.id, r.version, r.text) for r in rows])
        after = rows[-1].id


def _line(n: int, key: str, chunk: chunking.Chunk) -> BatchLine:
    return BatchLine(
        custom_id=f"L{n}",
        cache_key=key,
        content_hash=chunk.content_hash,
        text=chunk.text,
        est_tokens=chunk.tokens,
        status="pending",
    )


def _write(srt: Runtime, session: Session, mig: Migration, job: Lines) -> str:
    """One job, its lines and its ledger row, attributed to the migration."""
    job_id = str(uuid.uuid4())
    packing.record_job(srt, session, job_id, job, attempt=1)
    session.flush()
    session.execute(
        sa.update(ProviderRequest).where(ProviderRequest.id == job_id).values(migration=mig.to_physical)
    )
    return job_id
