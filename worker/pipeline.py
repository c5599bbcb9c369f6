"""What happens to pending work, top to bottom: one call per stage.

    claim documents (lease) → deletes: remove points
    upserts: chunk → look up paid-for vectors → plan batches of ≤ max rows
    → batches in waves of up to `request_concurrency` calls at once (worker/calls.py): permits →
      ledger intents → the calls → ledger results + cache
    → Qdrant write (version guard, stale chunks removed) → document indexed

Under a backlog (a full claim) only full batches go out; the rows of a partial batch wait
(their documents are handed back, and lead the next claim) until company arrives or they have
been held back for `batch_max_delay_s`. Without a backlog a partial batch goes at once.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

from worker import batching, chunking, telemetry
from worker.calls import embed_batches
from worker.calls import record_failure as record_failure  # worker/search.py closes its calls' rows
from worker.cycle import Cycle as Cycle  # what run_cycle returns
from worker.cycle import Work, failed, give_up, retry
from worker.errors import RetryLater, SidecarError, StoreConflict
from worker.holdback import HeldBack as HeldBack  # the embedding loop keeps one (worker/service.py)
from worker.ledger import counters
from worker.reembed import control, routes
from worker.runtime import Runtime
from worker.sql import cache, documents, pauses, settle
from worker.sql.models import ProviderPause, utcnow
from worker.vectorstore.base import ChunkVector, DocWrite, write_many

log = logging.getLogger(__name__)


def run_cycle(rt: Runtime, held: HeldBack | None = None) -> Cycle:
    """One pass over a claim of pending documents. `held` remembers held-back rows across
    cycles (the embedding loop passes its own); without it a partial batch never times out."""
    limit = rt.settings.claim_docs
    if held is not None:  # lone events streaming in: let a few more arrive first (worker/holdback.py)
        held.linger(rt.settings.batch_max_delay_s / 2)
    with rt.sessions.begin() as session:
        pause = session.get(ProviderPause, pauses.PROVIDER)
        if pause is not None and pause.until > utcnow():
            return Cycle(idle=True, paused=pause.reason)
        docs = telemetry.claimed(
            documents.claim, session, owner=rt.owner, limit=limit, lease_s=rt.settings.lease_s
        )
    try:
        return _work_on(rt, docs, held, pause is not None)
    except Exception:
        settle.release_failed(rt.sessions, [doc.id for doc in docs], owner=rt.owner)
        raise


def _work_on(rt: Runtime, docs: list[documents.Claimed], held: HeldBack | None, probing: bool) -> Cycle:
    limit = rt.settings.claim_docs
    control.step(rt)  # re-embeds under way: one step each (worker/reembed/control.py)
    if held is not None:
        held.noted(len(docs), full=rt.settings.claim_docs // 2)
    if not docs:
        return Cycle(idle=True)
    rt, docs = routes.for_cycle(rt, docs)  # this cycle's model; each collection's physical collection
    cycle = Cycle(claimed=len(docs))
    live = []
    for doc in docs:
        if doc.attempts > rt.settings.max_attempts:  # leased again and again, never finished
            give_up(rt, doc, f"gave up after {doc.attempts - 1} attempts that never finished", cycle)
        elif doc.op == "delete":
            apply_delete(rt, doc, cycle)
        else:
            live.append(doc)
    if not live:
        return cycle
    work = Work(docs=live, held=held or HeldBack(), probing=probing)
    plan_chunks(rt, work)
    rows = missing_rows(rt, work)
    batches = batching.plan_batches(
        rows,
        max_rows=rt.spec.max_rows,
        max_tokens_per_row=rt.spec.max_tokens_per_row,
        balance_tokens=True,
    )
    full, rest = batching.split_full(batches, rt.spec.max_rows)
    if rest and (len(docs) < limit or _held_s(work, rest) >= rt.settings.batch_max_delay_s):
        full.append(rest)  # no backlog to wait for, or these rows have waited long enough
    embed_batches(rt, work, full, cycle)
    finish(rt, work, cycle)
    return cycle


def apply_delete(rt: Runtime, doc: documents.Claimed, cycle: Cycle) -> None:
    try:
        ensure_collection(rt, doc.collection)  # so the delete leaves a tombstone even in a new collection
        rt.store.delete_document(doc.collection, doc.tenant, doc.doc_id, doc.version)
    except RetryLater as exc:
        retry(rt, doc, exc, cycle)
        return
    except SidecarError as exc:  # refused for good (GiveUp), or a collection that cannot work
        give_up(rt, doc, f"the vector store refused the delete: {exc}", cycle)
        return
    except Exception as exc:  # an adapter let a library error through: this document only
        give_up(rt, doc, f"the vector store failed the delete: {type(exc).__name__}", cycle)
        return
    with rt.sessions.begin() as session:
        if documents.mark_deleted(session, doc, owner=rt.owner):
            cycle.deleted += 1


def ensure_collection(rt: Runtime, collection: str) -> None:
    routes.ensure_collection(rt, collection)  # its physical collection and alias (worker/reembed/)


def plan_chunks(rt: Runtime, work: Work) -> None:
    for doc in work.docs:
        chunks = chunking.split_text(
            doc.text or "", max_tokens=rt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
        )
        work.chunks[doc.id] = chunks
        keys = [rt.cache_key(chunk.content_hash) for chunk in chunks]
        work.keys[doc.id] = keys
        for key, chunk in zip(keys, chunks, strict=True):
            work.users[key].append((doc, chunk))


def missing_rows(rt: Runtime, work: Work) -> list[batching.Row]:
    """Rows still to embed: chunks whose vectors were never paid for, each text once."""
    with rt.sessions.begin() as session:
        work.vectors.update(cache.get_many(session, work.users))
    work.cached = set(work.vectors)
    rows = []
    for key, users in work.users.items():
        if key not in work.vectors:
            chunk = users[0][1]
            rows.append(batching.Row(key=key, text=chunk.text, tokens=chunk.tokens))
    return rows


def _saved_tokens(work: Work, doc: documents.Claimed) -> int:
    """Tokens of this document not sent: chunks paid for before, or shared with another
    document of this cycle that carried them."""
    return sum(
        chunk.tokens
        for chunk, key in zip(work.chunks[doc.id], work.keys[doc.id], strict=True)
        if key in work.cached or work.users[key][0][0] is not doc
    )


def finish(rt: Runtime, work: Work, cycle: Cycle) -> None:
    """Write every document whose vectors are all there, then mark them indexed in one statement
    (hand back those waiting for a fuller batch in another); the rest fail."""
    waiting, ready = [], []
    for doc in work.docs:
        error = work.errors.get(doc.id)
        if error is not None:
            failed(rt, doc, error, cycle)
        elif not all(key in work.vectors for key in work.keys[doc.id]):
            waiting.append(doc)
        else:
            ready.append(doc)
    written = [(doc, len(work.chunks[doc.id])) for doc in write_documents(rt, work, ready, cycle)]
    if not (waiting or written):
        return
    with rt.sessions.begin() as session:
        indexed = settle.finish_many(session, written, waiting, owner=rt.owner)
        saved: Counter[tuple[str, str]] = Counter()
        for doc in indexed:
            saved[(doc.collection, doc.tenant)] += _saved_tokens(work, doc)
        counters.record_avoided(session, "dedup", saved, model=rt.embedder.model)
    cycle.indexed += len(indexed)
    cycle.held_back += len(waiting)


def write_documents(
    rt: Runtime, work: Work, docs: list[documents.Claimed], cycle: Cycle
) -> list[documents.Claimed]:
    """Write the documents' points, each collection's in one store call (`write_many`); returns
    those written. Should that call fail, they are written one by one, so that only the
    document at fault fails."""
    by_collection: dict[str, list[documents.Claimed]] = defaultdict(list)
    for doc in docs:
        by_collection[doc.collection].append(doc)
    written: list[documents.Claimed] = []
    for collection, group in by_collection.items():
        try:
            ensure_collection(rt, collection)
            points = sum(len(work.chunks[doc.id]) for doc in group)
            with telemetry.store_span(collection, points, len(group)):
                results = write_many(
                    rt.store,
                    collection,
                    [_doc_write(work, doc) for doc in group],
                    model=rt.embedder.model,
                    dimensions=rt.embedder.dimensions,
                )
        except Exception:  # whose fault it was: one by one (each failure handled there)
            written += [doc for doc in group if write_document(rt, work, doc, cycle)]
            continue
        rt.faults.reach("after_store_write")
        for doc, done in zip(group, results, strict=True):
            if done:
                work.held.done(doc.id)
                written.append(doc)
            else:  # the store holds a newer version or a delete: SQL will catch up or give up
                retry(
                    rt, doc, StoreConflict(f"the store holds a newer state than version {doc.version}"), cycle
                )
    return written


def _doc_write(work: Work, doc: documents.Claimed) -> DocWrite:
    chunks = [
        ChunkVector(
            chunk.index, chunk.text, chunk.content_hash, work.vectors[key].vector, work.vectors[key].sparse
        )
        for chunk, key in zip(work.chunks[doc.id], work.keys[doc.id], strict=True)
    ]
    return DocWrite(doc.tenant, doc.doc_id, doc.version, chunks, doc.meta or {})


def write_document(rt: Runtime, work: Work, doc: documents.Claimed, cycle: Cycle) -> bool:
    """Write one document's points (True when written); a refusal gives up on this document only."""
    one = _doc_write(work, doc)
    try:
        ensure_collection(rt, doc.collection)
        with telemetry.store_span(doc.collection, len(one.chunks)):
            written = rt.store.write_document(
                doc.collection,
                doc.tenant,
                doc.doc_id,
                doc.version,
                one.chunks,
                meta=one.meta,
                model=rt.embedder.model,
                dimensions=rt.embedder.dimensions,
            )
    except RetryLater as exc:
        retry(rt, doc, exc, cycle)
        return False
    except SidecarError as exc:  # refused for good (GiveUp), or a collection that cannot work
        give_up(rt, doc, f"the vector store refused the write: {exc}", cycle)
        return False
    except Exception as exc:  # an adapter let a library error through: this document only
        give_up(rt, doc, f"the vector store failed the write: {type(exc).__name__}", cycle)
        return False
    rt.faults.reach("after_store_write")
    if not written:  # the store holds a newer version or a delete: SQL will catch up or give up
        retry(rt, doc, StoreConflict(f"the store holds a newer state than version {doc.version}"), cycle)
        return False
    work.held.done(doc.id)
    return True


def _held_s(work: Work, rows: list[batching.Row]) -> float:
    """How long these rows have been held back waiting for a full batch (0 the first time)."""
    return work.held.waited_s([doc.id for row in rows for doc, _ in work.users[row.key]])
