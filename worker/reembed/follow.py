"""The follower: brings one side of a migration up to the text kept in SQL, a batch at a time.

A side is a physical collection and its model: `to` (being filled), and `from` (kept current
for a rollback once the alias is switched, and filled first when it replaces a plain
collection). A document is due on a side when SQL has settled it (indexed or deleted) at a
version the side has no mark of; the follower embeds the version's text with the side's model
(the embedding cache first: a vector paid for once is never paid again), writes it with the
store's version guard, or writes a tombstone for a delete, and then marks it. So:

- a live write always wins: the store refuses an older version over a newer one, and a version
  that moves on while it is followed is simply due again;
- a delete is never resurrected: its tombstone stops every older write;
- a kill loses nothing: marks are written after the store, a re-run writes the same points
  again, and the vectors come from the cache.

Every provider call is booked in the ledger like the pipeline's, with `migration` set to the
`to` collection (the spend of the re-embed) and its items naming the documents.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from worker import batching, chunking
from worker.errors import GiveUp, RetryLater, SidecarError
from worker.ledger import calls
from worker.reembed import parts
from worker.runtime import Runtime
from worker.sql import cache, pauses
from worker.sql.engines import insert_ignore
from worker.sql.models import Document, ProviderRequest
from worker.sql.reembed_models import Migration, MigrationMark
from worker.vectorstore.base import ChunkVector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Side:
    name: str  # to | from
    physical: str
    model: str
    dimensions: int


def sides(mig: Migration) -> dict[str, Side]:
    return {
        "to": Side("to", mig.to_physical, mig.to_model, mig.to_dimensions),
        "from": Side("from", mig.from_physical, mig.from_model, mig.from_dimensions),
    }


@dataclass(frozen=True)
class Due:
    id: int
    tenant: str
    doc_id: str
    version: int
    status: str
    text: str | None
    meta: dict[str, object] | None


def due_filter(mig_id: int, side: str, collection: str) -> tuple[sa.FromClause, sa.ColumnElement[bool]]:
    """Documents of the collection settled at a version this side has no mark of."""
    mark = sa.orm.aliased(MigrationMark)
    joined = sa.outerjoin(
        Document,
        mark,
        sa.and_(mark.migration_id == mig_id, mark.side == side, mark.document_id == Document.id),
    )
    where = sa.and_(
        Document.collection == collection,
        Document.status.in_(("indexed", "deleted")),
        sa.or_(mark.version.is_(None), mark.version < Document.version),
    )
    return joined, where


def due(rt: Runtime, mig: Migration, side: str, limit: int) -> list[Due]:
    joined, where = due_filter(mig.id, side, mig.collection)
    query = (
        sa.select(
            Document.id,
            Document.tenant,
            Document.doc_id,
            Document.version,
            Document.status,
            Document.text,
            Document.meta,
        )
        .select_from(joined)
        .where(where)
        .order_by(Document.id)
        .limit(limit)
    )
    with rt.sessions.begin() as session:
        return [Due(**row._mapping) for row in session.execute(query)]


def count_due(rt: Runtime, mig: Migration, side: str) -> int:
    joined, where = due_filter(mig.id, side, mig.collection)
    with rt.sessions.begin() as session:
        return int(session.execute(sa.select(sa.func.count()).select_from(joined).where(where)).scalar_one())


def follow(rt: Runtime, mig: Migration, side: Side) -> int:
    """One batch of due documents brought into `side`; how many were due (0: caught up)."""
    srt = parts.model_runtime(rt, side.model, side.dimensions)
    rows = srt.spec.max_rows  # a whole number of full requests of one-chunk documents
    batch = due(rt, mig, side.name, rows * max(1, rt.settings.claim_docs // rows))
    if not batch:
        return 0
    rt.store.ensure_collection(side.physical, side.dimensions, sparse=rt.settings.sparse_vectors)
    marks: list[Due] = []
    for doc in batch:
        if doc.status == "deleted":
            rt.store.delete_document(
                side.physical, doc.tenant, doc.doc_id, doc.version, dimensions=side.dimensions
            )
            marks.append(doc)
    live = [doc for doc in batch if doc.status == "indexed"]
    chunks = {
        doc.id: chunking.split_text(
            doc.text or "", max_tokens=srt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
        )
        for doc in live
    }
    vectors = _embed(srt, mig, side, live, chunks)
    for doc in live:
        keys = [srt.cache_key(c.content_hash) for c in chunks[doc.id]]
        points = [
            ChunkVector(c.index, c.text, c.content_hash, vectors[k].vector, vectors[k].sparse)
            for c, k in zip(chunks[doc.id], keys, strict=True)
        ]
        try:
            srt.store.write_document(
                side.physical,
                doc.tenant,
                doc.doc_id,
                doc.version,
                points,
                meta=dict(doc.meta or {}),
                model=side.model,
                dimensions=side.dimensions,
            )
        except GiveUp as exc:  # refused for good (as it would be on the other side): not retried
            log.warning(
                "reembed.refused migration=%d document=%d error=%s", mig.id, doc.id, type(exc).__name__
            )
        marks.append(doc)
    _mark(rt, mig.id, side.name, marks)
    return len(batch)


def _mark(rt: Runtime, mig_id: int, side: str, docs: list[Due]) -> None:
    with rt.sessions.begin() as session:
        for doc in docs:
            key = {"migration_id": mig_id, "side": side, "document_id": doc.id}
            if not insert_ignore(session, MigrationMark, {**key, "version": doc.version}):
                session.execute(
                    sa.update(MigrationMark)
                    .filter_by(**key)
                    .where(MigrationMark.version < doc.version)
                    .values(version=doc.version)
                )


def _embed(
    srt: Runtime, mig: Migration, side: Side, docs: list[Due], chunks: dict[int, list[chunking.Chunk]]
) -> dict[str, cache.Embedded]:
    """Every chunk's vector: from the cache, else paid for in batches of the model's rows."""
    users: dict[str, list[tuple[Due, chunking.Chunk]]] = {}
    for doc in docs:
        for chunk in chunks[doc.id]:
            users.setdefault(srt.cache_key(chunk.content_hash), []).append((doc, chunk))
    with srt.sessions.begin() as session:
        vectors = cache.get_many(session, users)
    rows = [
        batching.Row(key=key, text=found[0][1].text, tokens=found[0][1].tokens)
        for key, found in users.items()
        if key not in vectors
    ]
    for batch in batching.plan_batches(
        rows, max_rows=srt.spec.max_rows, max_tokens_per_row=srt.spec.max_tokens_per_row, balance_tokens=True
    ):
        vectors.update(_call(srt, mig, batch, users))
    return vectors


def _call(
    srt: Runtime, mig: Migration, rows: list[batching.Row], users: dict[str, list[tuple[Due, chunking.Chunk]]]
) -> dict[str, cache.Embedded]:
    """One paid call, booked like the pipeline's (budget, limiter, ledger before and after)."""
    est_tokens = sum(row.tokens for row in rows)
    permit = srt.limiter.acquire(est_tokens, timeout_s=srt.settings.lease_s / 4)
    items = [
        calls.ItemRef(d.id, d.version, c.index, c.content_hash, c.tokens)
        for r in rows
        for d, c in users[r.key]
    ]
    try:
        request_id = _open(srt, mig, len(rows), est_tokens, items)
    except SidecarError:
        srt.limiter.settle(permit, 0)
        raise
    try:
        result = srt.embedder.embed([row.text for row in rows])
    except SidecarError as exc:
        srt.limiter.settle(permit, 0)
        if exc.call is not None and exc.call.http_status == 429:
            srt.limiter.throttled(getattr(exc, "retry_after_s", None), permit=permit)
        with srt.sessions.begin() as session:
            unknown = srt.spec.cost_nano_cny(est_tokens) if exc.maybe_charged else None
            calls.record_failure(session, request_id, exc.call, message=str(exc), unknown_cost_nano=unknown)
            if exc.pauses_everyone:
                pauses.pause(session, f"provider account error: {exc}", for_s=srt.settings.account_pause_s)
        raise
    srt.limiter.settle(permit, result.billed_tokens)
    sparse = list(result.sparse) if result.sparse else [None] * len(rows)
    vectors = {row.key: cache.Embedded(v, s) for row, v, s in zip(rows, result.vectors, sparse, strict=True)}
    with srt.sessions.begin() as session:
        calls.record_success(session, request_id, result, srt.spec.cost_nano_cny(result.billed_tokens))
        cache.put_many(
            session,
            vectors,
            model=srt.embedder.model,
            dimensions=srt.embedder.dimensions,
            request_id=request_id,
        )
    log.info("reembed.embed migration=%d rows=%d tokens=%d", mig.id, len(rows), result.billed_tokens)
    return vectors


def _open(srt: Runtime, mig: Migration, rows: int, est_tokens: int, items: list[calls.ItemRef]) -> str:
    """The ledger's intent row, attributed to the migration, after the pause and budget checks."""
    request_id = str(uuid.uuid4())
    with srt.sessions.begin() as session:
        if (pause := pauses.active(session)) is not None:
            raise RetryLater(f"provider calls are paused: {pause.reason}")
        if srt.budget_check is not None:
            srt.budget_check(session, {mig.collection}, est_tokens)
        calls.open_request(
            session,
            request_id=request_id,
            model=srt.embedder.model,
            dimensions=srt.embedder.dimensions,
            api=srt.embedder.api,
            rows=rows,
            est_tokens=est_tokens,
            items=items,
            attempt=1,
            key_fingerprint=srt.settings.key_fingerprint(),
            worker=srt.owner,
        )
        session.execute(
            sa.update(ProviderRequest)
            .where(ProviderRequest.id == request_id)
            .values(migration=mig.to_physical)
        )
    return request_id
