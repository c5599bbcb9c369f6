"""What happens to pending work, top to bottom: one call per stage (DESIGN §1).

    claim documents (lease) → deletes: remove points
    upserts: chunk → look up paid-for vectors → plan batches of ≤ max rows
    → for each batch: limiter.reserve → ledger intent → embed → ledger result + cache
    → Qdrant write (version guard, stale chunks removed) → document indexed

Under a backlog (a full claim) only full batches go out; the rows of a partial batch wait
(their documents are handed back, and lead the next claim) until company arrives or they have
been held back for `batch_max_delay_s`. Without a backlog a partial batch goes at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

from worker import batching, chunking
from worker.errors import (
    AccountError,
    InputRejected,
    MalformedResponse,
    RetryLater,
    SidecarError,
    StoreConflict,
    StoreUnavailable,
)
from worker.ledger import calls, counters
from worker.runtime import Runtime
from worker.sql import cache, documents, pauses
from worker.sql.models import ProviderPause, utcnow
from worker.vectorstore.qdrant import ChunkVector

log = logging.getLogger(__name__)


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


@dataclass
class _Work:
    """Upserts of this cycle, their chunks and who needs which vector."""

    docs: list[documents.Claimed]
    chunks: dict[int, list[chunking.Chunk]] = field(default_factory=dict)
    keys: dict[int, list[str]] = field(default_factory=dict)
    users: dict[str, list[tuple[documents.Claimed, chunking.Chunk]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    vectors: dict[str, cache.Embedded] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)  # keys paid for before this cycle
    errors: dict[int, SidecarError] = field(default_factory=dict)


def run_cycle(rt: Runtime) -> Cycle:
    limit = rt.settings.claim_docs
    with rt.sessions.begin() as session:
        pause = session.get(ProviderPause, pauses.PROVIDER)
        if pause is not None and pause.until > utcnow():
            return Cycle(idle=True, paused=pause.reason)
        rt.probing = pause is not None  # expired: the first success after it clears the row
        docs = documents.claim(session, owner=rt.owner, limit=limit, lease_s=rt.settings.lease_s)
    if not docs:
        return Cycle(idle=True)
    cycle = Cycle(claimed=len(docs))
    live = []
    for doc in docs:
        if doc.attempts > rt.settings.max_attempts:  # leased again and again, never finished
            _give_up(rt, doc, f"gave up after {doc.attempts - 1} attempts that never finished", cycle)
        elif doc.op == "delete":
            apply_delete(rt, doc, cycle)
        else:
            live.append(doc)
    work = _Work(docs=live)
    if not work.docs:
        return cycle

    plan_chunks(rt, work)
    rows = missing_rows(rt, work)
    batches = batching.plan_batches(
        rows,
        max_rows=rt.spec.max_rows,
        max_tokens_per_row=rt.spec.max_tokens_per_row,
        balance_tokens=True,
    )
    full, rest = batching.split_full(batches, rt.spec.max_rows)
    if rest and (len(docs) < limit or _held_s(rt, work, rest) >= rt.settings.batch_max_delay_s):
        full.append(rest)  # no backlog to wait for, or these rows have waited long enough
    renewed = time.monotonic()
    for batch in full:
        if time.monotonic() - renewed > rt.settings.lease_s / 3:  # a long cycle keeps its leases
            with rt.sessions.begin() as session:
                documents.renew(session, work.docs, owner=rt.owner, lease_s=rt.settings.lease_s)
            renewed = time.monotonic()
        if not embed_rows(rt, work, batch, cycle):
            break  # the provider asked us to back off: leave the rest for later
    finish(rt, work, cycle)
    return cycle


def apply_delete(rt: Runtime, doc: documents.Claimed, cycle: Cycle) -> None:
    try:
        ensure_collection(rt, doc.collection)  # so the delete leaves a tombstone even in a new collection
        rt.store.delete_document(doc.collection, doc.tenant, doc.doc_id, doc.version)
    except RetryLater as exc:
        _retry(rt, doc, exc, cycle)
        return
    except SidecarError as exc:
        _give_up(rt, doc, f"the vector store refused the delete: {exc}", cycle)
        return
    with rt.sessions.begin() as session:
        if documents.mark_deleted(session, doc, owner=rt.owner):
            cycle.deleted += 1


def ensure_collection(rt: Runtime, collection: str) -> None:
    rt.store.ensure_collection(collection, rt.embedder.dimensions, sparse=rt.settings.sparse_vectors)


def plan_chunks(rt: Runtime, work: _Work) -> None:
    for doc in work.docs:
        chunks = chunking.split_text(
            doc.text or "", max_tokens=rt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
        )
        work.chunks[doc.id] = chunks
        keys = [rt.cache_key(chunk.content_hash) for chunk in chunks]
        work.keys[doc.id] = keys
        for key, chunk in zip(keys, chunks):
            work.users[key].append((doc, chunk))


def missing_rows(rt: Runtime, work: _Work) -> list[batching.Row]:
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


def _saved_tokens(work: _Work, doc: documents.Claimed) -> int:
    """Tokens of this document not sent: chunks paid for before, or shared with another
    document of this cycle that carried them."""
    return sum(
        chunk.tokens
        for chunk, key in zip(work.chunks[doc.id], work.keys[doc.id])
        if key in work.cached or work.users[key][0][0] is not doc
    )


def embed_rows(rt: Runtime, work: _Work, rows: list[batching.Row], cycle: Cycle) -> bool:
    """Embed one batch; False when the provider or the limiter asks everyone to wait."""
    try:
        work.vectors.update(call_provider(rt, work, rows, cycle))
        return True
    except InputRejected as exc:
        if len(rows) > 1:  # narrow the rejection down to the offending text
            half = len(rows) // 2
            return embed_rows(rt, work, rows[:half], cycle) and embed_rows(rt, work, rows[half:], cycle)
        for doc, _chunk in work.users[rows[0].key]:
            work.errors[doc.id] = exc
        return True
    except (RetryLater, AccountError) as exc:
        for row in rows:
            for doc, _chunk in work.users[row.key]:
                work.errors.setdefault(doc.id, exc)
        return False


def call_provider(
    rt: Runtime, work: _Work, rows: list[batching.Row], cycle: Cycle
) -> dict[str, cache.Embedded]:
    est_tokens = sum(row.tokens for row in rows)
    permit = rt.limiter.acquire(est_tokens, timeout_s=rt.settings.lease_s / 4)
    request_id = str(uuid.uuid4())
    items = [
        calls.ItemRef(doc.id, doc.version, chunk.index, chunk.content_hash, chunk.tokens)
        for row in rows
        for doc, chunk in work.users[row.key]
    ]
    with rt.sessions.begin() as session:
        if rt.budget_check is not None:
            try:  # checked with the intent row written in the same transaction: no joint overshoot
                rt.budget_check(session, work, rows, est_tokens)
            except RetryLater:
                rt.limiter.settle(permit, 0)
                raise
        calls.open_request(
            session,
            request_id=request_id,
            model=rt.embedder.model,
            dimensions=rt.embedder.dimensions,
            api=rt.embedder.api,
            rows=len(rows),
            est_tokens=est_tokens,
            items=items,
            attempt=max(doc.attempts for doc, _ in work.users[rows[0].key]),
            key_fingerprint=rt.settings.key_fingerprint(),
            worker=rt.owner,
        )
    cycle.requests += 1
    rt.crash("before_call")
    try:
        result = rt.embedder.embed([row.text for row in rows])
    except SidecarError as exc:
        rt.limiter.settle(permit, 0)
        if exc.call is not None and exc.call.http_status == 429:
            rt.limiter.throttled(getattr(exc, "retry_after_s", None), permit=permit)
        with rt.sessions.begin() as session:
            calls.record_failure(
                session,
                request_id,
                exc.call,
                message=str(exc),
                unknown_cost_nano=rt.spec.cost_nano_cny(est_tokens) if outcome_unknown(exc) else None,
            )
            if isinstance(exc, AccountError):
                pauses.pause(session, f"provider account error: {exc}", for_s=rt.settings.account_pause_s)
        log.warning("embed.failed id=%s rows=%d error=%s", request_id, len(rows), type(exc).__name__)
        raise
    rt.crash("after_call")
    rt.limiter.settle(permit, result.billed_tokens)
    sparse = result.sparse or [None] * len(rows)
    vectors = {
        row.key: cache.Embedded(vector, weights) for row, vector, weights in zip(rows, result.vectors, sparse)
    }
    with rt.sessions.begin() as session:
        calls.record_success(session, request_id, result, rt.spec.cost_nano_cny(result.billed_tokens))
        cache.put_many(
            session,
            vectors,
            model=rt.embedder.model,
            dimensions=rt.embedder.dimensions,
            request_id=request_id,
        )
        if rt.probing:
            pauses.clear(session)
            rt.probing = False
    rt.crash("after_ledger")
    cycle.rows += len(rows)
    log.info(
        "embed.done request_id=%s rows=%d tokens=%d ms=%.0f",
        result.request_id,
        len(rows),
        result.billed_tokens,
        result.latency_ms,
    )
    return vectors


def outcome_unknown(exc: SidecarError) -> bool:
    """True when the provider may have billed a call we got nothing usable from: a read timeout,
    a dropped connection, a malformed 2xx answer. A connection never made was not billed."""
    if isinstance(exc, MalformedResponse):
        return True  # the provider answered (and likely billed) but the answer was unusable
    status = exc.call.http_status if exc.call is not None else None
    if status is not None and not 200 <= status < 300:
        return False  # an error answer: not billed
    cause = exc.__cause__
    return not isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout))


def finish(rt: Runtime, work: _Work, cycle: Cycle) -> None:
    """Write every document whose vectors are all there; the rest fail or wait."""
    for doc in work.docs:
        error = work.errors.get(doc.id)
        if error is not None:
            _failed(rt, doc, error, cycle)
            continue
        keys = work.keys[doc.id]
        if not all(key in work.vectors for key in keys):
            with rt.sessions.begin() as session:
                documents.release(session, doc, owner=rt.owner)
            cycle.held_back += 1
            continue
        chunks = [
            ChunkVector(
                chunk.index,
                chunk.text,
                chunk.content_hash,
                work.vectors[key].vector,
                work.vectors[key].sparse,
            )
            for chunk, key in zip(work.chunks[doc.id], keys)
        ]
        try:
            ensure_collection(rt, doc.collection)
            written = rt.store.write_document(
                doc.collection,
                doc.tenant,
                doc.doc_id,
                doc.version,
                chunks,
                meta=doc.meta or {},
                model=rt.embedder.model,
                dimensions=rt.embedder.dimensions,
            )
        except RetryLater as exc:
            _retry(rt, doc, exc, cycle)
            continue
        except (SidecarError, ValueError) as exc:  # e.g. a collection of another size: say why, move on
            _give_up(rt, doc, f"the vector store refused the write: {exc}", cycle)
            continue
        rt.crash("after_store_write")
        if not written:  # the store holds a newer version or a delete: SQL will catch up or give up
            _retry(rt, doc, StoreConflict(f"the store holds a newer state than version {doc.version}"), cycle)
            continue
        rt.held_since.pop(doc.id, None)
        with rt.sessions.begin() as session:
            if documents.mark_indexed(session, doc, owner=rt.owner, chunk_count=len(chunks)):
                cycle.indexed += 1
                if saved := _saved_tokens(work, doc):
                    counters.record_avoided(
                        session, "dedup", {(doc.collection, doc.tenant): saved}, model=rt.embedder.model
                    )


def _failed(rt: Runtime, doc: documents.Claimed, error: SidecarError, cycle: Cycle) -> None:
    if isinstance(error, InputRejected):
        _give_up(rt, doc, f"provider rejected the text: {error}", cycle)
    else:
        _retry(rt, doc, error, cycle)


def _give_up(rt: Runtime, doc: documents.Claimed, reason: str, cycle: Cycle) -> None:
    with rt.sessions.begin() as session:
        documents.give_up(session, doc, owner=rt.owner, error=reason)
    cycle.dead += 1
    log.warning("document.dead id=%d reason=%s", doc.id, reason.split(":")[0])


def _retry(rt: Runtime, doc: documents.Claimed, error: SidecarError, cycle: Cycle) -> None:
    """Back to pending after a backoff; only failures that may be the document's own count."""
    counts = isinstance(error, (MalformedResponse, StoreUnavailable, StoreConflict))
    delay = 60.0 if isinstance(error, AccountError) else min(60.0, 0.5 * 2 ** min(doc.attempts, 7))
    retry_after = getattr(error, "retry_after_s", None) or 0.0
    with rt.sessions.begin() as session:
        outcome = documents.fail(
            session,
            doc,
            owner=rt.owner,
            error=f"{type(error).__name__}: {error}",
            retry_after_s=max(delay, retry_after),
            max_attempts=rt.settings.max_attempts if counts else None,
        )
    cycle.failed += 1
    cycle.dead += outcome == "dead"


def _held_s(rt: Runtime, work: _Work, rows: list[batching.Row]) -> float:
    """How long these rows have been held back waiting for a full batch (0 the first time)."""
    now = time.monotonic()
    if len(rt.held_since) > 100_000:  # documents finished elsewhere are never popped here
        rt.held_since.clear()
    return max(now - rt.held_since.setdefault(doc.id, now) for row in rows for doc, _ in work.users[row.key])
