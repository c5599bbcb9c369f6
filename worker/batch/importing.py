"""Bring a finished batch job home: read its output and error files, keep every answered line's
vectors (the embedding cache) and request id, close its ledger row at the batch price, then write
its documents with the same guards as real-time writes.

Both halves are idempotent, so a crash anywhere in them is repaired by running them again: the
first is one transaction (lines, cache, ledger, job state `imported`); the second writes each
document still leased to the job at the job's version (a newer version, on either lane, wins:
SQL's version rule and the store's version guard) and hands back those whose lines failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import chunking
from worker.batch.packing import owner_of
from worker.errors import RetryLater, SidecarError
from worker.reembed import parts, routes
from worker.runtime import Runtime
from worker.sql import cache, documents
from worker.sql.batch_models import BatchDocument, BatchJob, BatchLine
from worker.sql.models import Document, ProviderRequest, utcnow
from worker.vectorstore.base import ChunkVector

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 500
CACHE_CHUNK = 500  # vectors written to the cache, and documents written to the store, per round


@dataclass
class Answers:
    """What the output and error files said, by custom_id."""

    vectors: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    errors: dict[str, tuple[int | None, str]] = field(default_factory=dict)  # (status, message)


def read_files(output: bytes, error: bytes, dimensions: int) -> Answers:
    """Parse both files; a line that cannot be used counts as failed (it is sent again)."""
    answers = Answers()
    for raw in (output + b"\n" + error).split(b"\n"):
        if raw.strip():
            _read_line(raw, dimensions, answers)
    return answers


def _read_line(raw: bytes, dimensions: int, answers: Answers) -> None:
    try:
        line = json.loads(raw)
        custom_id = str(line["custom_id"])[:64]
    except (ValueError, KeyError, TypeError):
        return  # no custom_id: the line it belonged to stays unanswered, and is sent again
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    status = response.get("status_code")
    request_id = response.get("request_id")
    if isinstance(request_id, str):
        answers.request_ids[custom_id] = request_id[:128]
    try:
        if status != 200:
            raise ValueError(_error_text(line.get("error")))
        body = response["body"]
        vector = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
        tokens = body["usage"].get("prompt_tokens", body["usage"].get("total_tokens"))
        if vector.shape != (dimensions,) or not np.isfinite(vector).all():
            raise ValueError(f"{vector.size} dimensions or a non-finite value")
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError("usage has no token count")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        answers.errors[custom_id] = (status if isinstance(status, int) else None, str(exc)[:MAX_ERROR_CHARS])
        return
    answers.vectors[custom_id] = vector
    answers.tokens[custom_id] = tokens


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('code') or '-'}: {error.get('message') or ''}"
    return "no answer"


def record_answers(
    rt: Runtime, session: Session, job: BatchJob, answers: Answers, *, provider_status: str
) -> None:
    """One transaction: lines, cache, ledger row (batch price) and the job, now `imported`."""
    lines = list(session.execute(sa.select(BatchLine).where(BatchLine.job_id == job.id)).scalars())
    vectors: dict[str, cache.Embedded] = {}
    for line in lines:
        line.provider_request_id = answers.request_ids.get(line.custom_id)
        if line.custom_id in answers.vectors:
            line.status, line.billed_tokens = "succeeded", answers.tokens[line.custom_id]
            vectors[line.cache_key] = cache.Embedded(answers.vectors[line.custom_id].tolist())
        else:
            status, message = answers.errors.get(line.custom_id, (None, "no answer in the output files"))
            line.status, line.billed_tokens, line.error = "failed", 0, f"{status or '-'} {message}"
        line.text = None  # answered: the document keeps the text
        if len(vectors) >= CACHE_CHUNK:  # a few at a time: vectors as Python lists are large
            cache.put_many(session, vectors, model=job.model, dimensions=job.dimensions, request_id=job.id)
            vectors = {}
    cache.put_many(session, vectors, model=job.model, dimensions=job.dimensions, request_id=job.id)
    billed = sum(line.billed_tokens or 0 for line in lines)
    job.completed_lines = sum(line.status == "succeeded" for line in lines)
    job.failed_lines = len(lines) - job.completed_lines
    job.billed_tokens, job.provider_status, job.state = billed, provider_status, "imported"
    request = session.get(ProviderRequest, job.id)
    if request is not None:
        request.status = "succeeded" if job.completed_lines else "failed"
        request.provider_request_id = job.provider_batch_id
        request.billed_tokens = billed
        spec = parts.model_runtime(rt, job.model, job.dimensions).spec  # the job's model's price
        request.cost_nano_cny = spec.cost_nano_cny(billed, batch=True)
        request.http_status = 200 if job.completed_lines else None
        request.completed_at = utcnow()
        if job.failed_lines:
            request.error_message = (
                f"batch {provider_status}: {job.failed_lines} of {len(lines)} lines not embedded; sent again"
            )


@dataclass
class Written:
    indexed: int = 0
    retried: int = 0
    dead: int = 0
    superseded: int = 0


def write_documents(
    rt: Runtime, job: BatchJob, *, counts_attempt: bool = False, renew: Callable[[], None] | None = None
) -> Written:
    """Write every document still leased to the job at its version; hand back the others.
    Each goes to its collection's routed physical collection, chunked and keyed by the job's
    model; one whose collection moved to another model meanwhile (a re-embed) is handed back to
    the batch lane (its next job embeds it with the new model).
    `counts_attempt`: the provider refused the whole job, which counts against each document;
    `renew` is called between groups of documents (the caller's job lease)."""
    owner = owner_of(job.id)
    mrt = parts.model_runtime(rt, job.model, job.dimensions)
    with rt.sessions() as session:
        rows = session.execute(
            sa.select(Document, BatchDocument.version)
            .join(BatchDocument, BatchDocument.document_id == Document.id)
            .where(BatchDocument.job_id == job.id, Document.lease_owner == owner)
        ).all()
        failures = dict(
            session.execute(
                sa.select(BatchLine.content_hash, BatchLine.error).where(
                    BatchLine.job_id == job.id, BatchLine.status == "failed"
                )
            ).all()
        )
        claimed = [(_claimed(doc), version) for doc, version in rows]
    written = Written()
    for start in range(0, len(claimed), CACHE_CHUNK):
        if renew is not None:
            renew()
        part = claimed[start : start + CACHE_CHUNK]
        found = routes.resolve(rt, {doc.collection for doc, _version in part})
        wrt = dataclasses.replace(mrt, store=routes.RoutedStore(rt, found))
        group = [(doc, _chunks(mrt, doc)) for doc, _version in part]
        settle: list[tuple[documents.Claimed, int | None] | None] = []
        with rt.sessions() as session:
            vectors = cache.get_many(session, {mrt.cache_key(c.content_hash) for _d, cs in group for c in cs})
        for (doc, chunks), (_doc, version) in zip(group, part, strict=True):
            route = found.get(doc.collection)
            moved = route is not None and route.key != (job.model, job.dimensions)
            if doc.version != version or moved:  # a newer version, or another model: hand it back
                with rt.sessions.begin() as session:
                    documents.release(session, doc, owner=owner)
                written.superseded += 1
                continue
            settle.append(_write_one(wrt, doc, chunks, vectors, (owner, failures, counts_attempt), written))
        _settle(rt, owner, settle, written)
    return written


def _settle(
    rt: Runtime, owner: str, settle: list[tuple[documents.Claimed, int | None] | None], written: Written
) -> None:
    """Mark a group of written documents indexed in one transaction (a crash before it leaves
    them leased to the job, and the job writes them again: the writes are idempotent)."""
    with rt.sessions.begin() as session:
        for item in settle:
            if item is None:
                continue
            doc, chunk_count = item
            if (
                chunk_count is None
            ):  # the store holds a newer state: SQL catches up, or the reconciler repairs
                documents.release(session, doc, owner=owner)
                written.superseded += 1
            elif documents.mark_indexed(session, doc, owner=owner, chunk_count=chunk_count):
                written.indexed += 1
    settle.clear()


def _chunks(rt: Runtime, doc: documents.Claimed) -> list[chunking.Chunk]:
    return chunking.split_text(
        doc.text or "", max_tokens=rt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
    )


def _claimed(doc: Document) -> documents.Claimed:
    return documents.Claimed(
        id=doc.id,
        tenant=doc.tenant,
        collection=doc.collection,
        doc_id=doc.doc_id,
        version=doc.version,
        op=doc.op,
        text=doc.text,
        text_hash=doc.text_hash,
        meta=doc.meta,
        attempts=doc.attempts,
        updated_at=doc.updated_at,
    )


def _write_one(
    rt: Runtime,
    doc: documents.Claimed,
    chunks: list[chunking.Chunk],
    vectors: dict[str, cache.Embedded],
    context: tuple[str, dict[str, str | None], bool],
    written: Written,
) -> tuple[documents.Claimed, int | None] | None:
    """Write one document's points; (doc, chunk count) to mark indexed, (doc, None) when the
    store holds a newer state, None when the document was handed back or given up."""
    owner, failures, counts_attempt = context
    keys = [rt.cache_key(chunk.content_hash) for chunk in chunks]
    missing = [
        failures.get(c.content_hash) or "no answer"
        for c, k in zip(chunks, keys, strict=True)
        if k not in vectors
    ]
    if missing:
        _line_failed(rt, doc, owner, missing[0], written, counts_attempt)
        return None
    points = [
        ChunkVector(chunk.index, chunk.text, chunk.content_hash, vectors[key].vector, vectors[key].sparse)
        for chunk, key in zip(chunks, keys, strict=True)
    ]
    try:
        routes.ensure_collection(rt, doc.collection)  # its physical collection and alias
        stored = rt.store.write_document(
            doc.collection, doc.tenant, doc.doc_id, doc.version, points,
            meta=doc.meta or {}, model=rt.embedder.model, dimensions=rt.embedder.dimensions,
        )  # fmt: skip
    except RetryLater as exc:
        _retry(rt, doc, owner, f"{type(exc).__name__}: {exc}", written, counts=False)
        return None
    except SidecarError as exc:
        _give_up(rt, doc, owner, f"the vector store refused the write: {exc}", written)
        return None
    return doc, len(points) if stored else None


def _line_failed(
    rt: Runtime, doc: documents.Claimed, owner: str, error: str, written: Written, counts_attempt: bool
) -> None:
    """A line of this document failed: a refusal of the text (4xx) gives up on it; anything else
    (a 5xx, an expired or cancelled job) sends it back to the batch lane."""
    status = error.split(" ", 1)[0]
    if status.isdigit() and 400 <= int(status) < 500 and status != "429":
        _give_up(rt, doc, owner, f"provider rejected the text: {error}", written)
    else:
        _retry(rt, doc, owner, f"batch line failed: {error}", written, counts=counts_attempt)


def _retry(
    rt: Runtime, doc: documents.Claimed, owner: str, error: str, written: Written, *, counts: bool
) -> None:
    with rt.sessions.begin() as session:
        outcome = documents.fail(
            session,
            doc,
            owner=owner,
            error=error,
            retry_after_s=0.0,
            max_attempts=rt.settings.max_attempts if counts else None,
        )
    written.retried += outcome != "dead"
    written.dead += outcome == "dead"


def _give_up(rt: Runtime, doc: documents.Claimed, owner: str, reason: str, written: Written) -> None:
    with rt.sessions.begin() as session:
        documents.give_up(session, doc, owner=owner, error=reason)
    written.dead += 1
    log.warning("batch.document_dead id=%d reason=%s", doc.id, reason.split(":")[0])
