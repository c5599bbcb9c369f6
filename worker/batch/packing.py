"""Pack pending batch-lane documents into one job, all in one transaction before any upload:
lease the documents to the job, keep those routed to one model (a job is one model; each
collection's model and physical collection come from worker/reembed/routes.py), chunk them,
skip chunks already paid for, one line per distinct text up to the job's line limit, check the
budget at the batch price of the job's model, then write the job, its lines and documents, and
its ledger row (`lane` batch, `sent`). A crash before the commit leaves nothing; after it, the
job is in SQL and the lane carries it on from there.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import chunking
from worker.batch.report import model_reason
from worker.ledger import budget, calls
from worker.reembed import parts, routes
from worker.runtime import Runtime
from worker.sql import cache, documents
from worker.sql.batch_models import BatchDocument, BatchJob, BatchLine
from worker.sql.models import Document, utcnow
from worker.sql.reembed_models import CollectionModel

JOB_LEASE_MARGIN_S = 86_400.0  # documents stay leased to a job for its window plus this


@dataclass
class Lines:
    """The lines of a job being packed: one per distinct text not paid for yet."""

    by_key: dict[str, BatchLine] = field(default_factory=dict)
    items: list[calls.ItemRef] = field(default_factory=list)
    tokens: int = 0


def window_s(completion_window: str) -> float:
    """Seconds of a completion window such as "24h" or "14d" (24 h when unreadable)."""
    unit = {"h": 3600, "d": 86_400}.get(completion_window[-1:], 0)
    digits = completion_window[:-1]
    return float(int(digits) * unit) if digits.isdigit() and unit else 86_400.0


def owner_of(job_id: str) -> str:
    """The lease owner of the documents a job serves."""
    return f"{documents.BATCH_OWNER_PREFIX}{job_id}"


def waiting(session: Session) -> tuple[int, dt.datetime | None]:
    """Batch-lane documents waiting for a job: how many, and since when the oldest waits."""
    now = utcnow()
    count, oldest = session.execute(
        sa.select(sa.func.count(), sa.func.min(Document.updated_at)).where(
            Document.status == "pending",
            Document.lane == "batch",
            Document.op == "upsert",
            sa.or_(Document.lease_until.is_(None), Document.lease_until < now),
        )
    ).one()
    return int(count), oldest


def pack(rt: Runtime, session: Session) -> str | None:
    """Write one job over the waiting batch-lane documents; its id, or None when none wait.

    One job is one model (the provider takes one model per file): the documents are routed
    (worker/reembed/routes.py), the job takes those of the oldest one's model and hands the
    others back for the next job. Lines, cache keys, price and budget are that model's.
    BudgetExceeded (raised before anything is written) leaves the caller to roll back."""
    settings = rt.settings
    job_id = str(uuid.uuid4())
    lease_s = window_s(settings.batch_completion_window) + JOB_LEASE_MARGIN_S
    docs = documents.claim_batch(
        session, owner=owner_of(job_id), limit=settings.batch_max_lines, lease_s=lease_s
    )
    if not docs:
        return None
    mrt, docs = _one_model(rt, session, docs, owner_of(job_id))
    if not docs:
        return None
    lines = Lines()
    kept = _plan_lines(mrt, session, docs, lines)
    for doc in docs[len(kept) :]:  # over the line limit: the next job takes them
        documents.release(session, doc, owner=owner_of(job_id))
    if mrt.budget_check is not None and lines.tokens:
        budget.admit(
            session,
            collections={doc.collection for doc in kept},
            est_cost_nano=mrt.spec.cost_nano_cny(lines.tokens, batch=True),
            settings=mrt.settings,
            lock=True,
        )
    _write_job(mrt, session, job_id, kept, lines)
    return job_id


def _one_model(
    rt: Runtime, session: Session, docs: list[documents.Claimed], owner: str
) -> tuple[Runtime, list[documents.Claimed]]:
    """The runtime of the oldest document's model and the documents routed to it; documents of
    other models are handed back (the next job takes them), and those of a model the Batch API
    does not serve move to the real-time lane."""
    found = routes_in(session, {doc.collection for doc in docs})
    default = routes.Route("", rt.embedder.model, rt.embedder.dimensions, "")
    keys = {doc.id: found.get(doc.collection, default).key for doc in docs}
    unserved = [doc for doc in docs if model_reason(keys[doc.id][0]) is not None]
    if unserved:
        to_realtime(session, [doc.id for doc in unserved])
    served = [doc for doc in docs if model_reason(keys[doc.id][0]) is None]
    if not served:
        return rt, []
    key = keys[served[0].id]
    for doc in served:
        if keys[doc.id] != key:
            documents.release(session, doc, owner=owner)
    return parts.model_runtime(rt, *key), [doc for doc in served if keys[doc.id] == key]


def routes_in(session: Session, collections: set[str]) -> dict[str, routes.Route]:
    """The routes of these collections read in the caller's transaction (a second transaction
    would wait on SQLite's write lock); one not registered yet is the configured model's (the
    lane registers waiting collections before it packs: `register_waiting`)."""
    rows = session.execute(
        sa.select(CollectionModel).where(CollectionModel.collection.in_(sorted(collections)))
    ).scalars()
    return {r.collection: routes.Route(r.collection, r.model, r.dimensions, r.physical) for r in rows}


def register_waiting(rt: Runtime) -> None:
    """Register the collections of waiting batch-lane documents (worker/reembed/routes.py)."""
    with rt.sessions() as session:
        collections = set(
            session.execute(
                sa.select(Document.collection)
                .where(Document.status == "pending", Document.lane == "batch")
                .distinct()
            ).scalars()
        )
    if collections:
        routes.resolve(rt, collections)


def to_realtime(session: Session, document_ids: list[int]) -> int:
    """Move these pending batch-lane documents to the real-time lane (unleased); how many."""
    moved = 0
    for start in range(0, len(document_ids), 500):
        result = session.execute(
            sa.update(Document)
            .where(Document.id.in_(document_ids[start : start + 500]), Document.status == "pending")
            .values(lane="realtime", lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        moved += int(getattr(result, "rowcount", 0) or 0)
    return moved


def _plan_lines(
    rt: Runtime, session: Session, docs: list[documents.Claimed], lines: Lines
) -> list[documents.Claimed]:
    """Add each document's unpaid chunks as lines until the job is full; the documents kept."""
    limit = rt.settings.batch_max_lines
    planned = []
    for doc in docs:
        chunks = chunking.split_text(
            doc.text or "", max_tokens=rt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
        )
        planned.append((doc, chunks, [rt.cache_key(chunk.content_hash) for chunk in chunks]))
    paid = set(cache.get_many(session, {key for _doc, _chunks, keys in planned for key in keys}))
    kept: list[documents.Claimed] = []
    for doc, chunks, keys in planned:
        new = {k for k in keys if k not in paid and k not in lines.by_key}
        if kept and len(lines.by_key) + len(new) > limit:
            break
        kept.append(doc)
        for key, chunk in zip(keys, chunks, strict=True):
            if key in paid:
                continue
            if key not in lines.by_key:
                lines.by_key[key] = BatchLine(
                    custom_id=f"L{len(lines.by_key)}",
                    cache_key=key,
                    content_hash=chunk.content_hash,
                    text=chunk.text,
                    est_tokens=chunk.tokens,
                    status="pending",
                )
                lines.tokens += chunk.tokens
            lines.items.append(
                calls.ItemRef(doc.id, doc.version, chunk.index, chunk.content_hash, chunk.tokens)
            )
    return kept


def _write_job(
    rt: Runtime, session: Session, job_id: str, docs: list[documents.Claimed], lines: Lines
) -> None:
    """The job, its lines and documents, and (when it has lines) its ledger row."""
    record_job(rt, session, job_id, lines, attempt=max(d.attempts for d in docs))
    session.execute(
        sa.insert(BatchDocument),
        [{"job_id": job_id, "document_id": d.id, "version": d.version} for d in docs],
    )


def record_job(rt: Runtime, session: Session, job_id: str, lines: Lines, *, attempt: int) -> None:
    """A job row of `rt`'s model with its lines and, when it has lines, its ledger row (lane and
    api batch, `sent`): what must be in SQL before anything is uploaded. A job of no lines (all
    paid for already) is `imported` at once: its documents only need writing."""
    now = utcnow()
    session.add(
        BatchJob(
            id=job_id,
            state="packed" if lines.by_key else "imported",
            model=rt.embedder.model,
            dimensions=rt.embedder.dimensions,
            lines=len(lines.by_key),
            est_tokens=lines.tokens,
            completed_lines=0,
            failed_lines=0,
            due_at=now,
            created_at=now,
        )
    )
    session.flush()
    for line in lines.by_key.values():
        line.job_id = job_id
    session.add_all(lines.by_key.values())
    if lines.by_key:
        calls.open_request(
            session,
            request_id=job_id,
            model=rt.embedder.model,
            dimensions=rt.embedder.dimensions,
            api="batch",
            rows=len(lines.by_key),
            est_tokens=lines.tokens,
            items=lines.items,
            attempt=attempt,
            key_fingerprint=rt.settings.key_fingerprint(),
            worker=rt.owner,
            lane="batch",
        )


def input_file(session: Session, job: BatchJob) -> bytes:
    """The job's JSONL input file: one embedding request per line, in line order."""
    rows = session.execute(
        sa.select(BatchLine.custom_id, BatchLine.text)
        .where(BatchLine.job_id == job.id)
        .order_by(BatchLine.id)
    ).all()
    out = []
    for custom_id, text in rows:
        body = {"model": job.model, "input": text, "dimensions": job.dimensions, "encoding_format": "float"}
        line = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}
        out.append(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def enqueue(session: Session, document_ids: list[int]) -> int:
    """Send these documents (by SQL id) through the batch lane: each live one becomes pending on
    the batch lane at its current version, to be embedded (paid-for chunks cost nothing) and
    written again. For a backfill of existing text (a re-embed). Returns how many."""
    if not document_ids:
        return 0
    result = session.execute(
        sa.update(Document)
        .where(Document.id.in_(document_ids), Document.op == "upsert", Document.status != "dead")
        .values(status="pending", lane="batch", attempts=0, last_error=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
