"""The vector-store seam: the `VectorStore` Protocol, the values it takes and returns, and the
point ids every implementation uses. Adapters: worker/vectorstore/qdrant.py (a Qdrant server, or
qdrant-client local mode) and worker/vectorstore/edge.py (Qdrant Edge in-process, the default).

Point id: UUIDv5 of tenant, collection, doc_id and chunk index, stable across retries, so every
write is idempotent. A document's tombstone (written by a delete) has chunk index -1.
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from worker.errors import StoreRejected
from worker.reembed.names import logical_name

NAMESPACE = uuid.UUID("1bae0afb-c502-4426-85c8-38c2ad0ba6eb")  # fixed forever: ids depend on it
DENSE = "dense"
SPARSE = "sparse"
TOMBSTONE_INDEX = -1
RRF_K = 60

# Exact matches on payload `meta.<key>` a search narrows to.
MetaFilter = dict[str, str | int | bool]


def check_dimensions(chunks: list[ChunkVector], dimensions: int) -> None:
    """Refuse (StoreRejected) a chunk whose vector is not of the collection's size."""
    for chunk in chunks:
        if len(chunk.vector) != dimensions:
            raise StoreRejected(
                f"chunk {chunk.chunk_index}: vector has {len(chunk.vector)} dimensions, not {dimensions}"
            )


def chunk_payloads(
    tenant: str,
    doc_id: str,
    version: int,
    chunks: list[ChunkVector],
    stamp: dict[str, Any],
    *,
    store_text: bool,
) -> list[dict[str, Any]]:
    """The payload of each chunk point of one document version: the collection contract readers
    rely on (README "Migration notes" has its one addition, the tombstone). `stamp` holds the
    document's `meta` and the `model` and `dimensions` that embedded it."""
    embedded_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    return [
        {
            "doc_id": doc_id,
            "tenant": tenant,
            "chunk_index": chunk.chunk_index,
            "chunk_count": len(chunks),
            "version": version,
            "content_hash": chunk.content_hash,
            **({"text": chunk.text} if store_text else {}),
            "meta": dict(stamp["meta"]),
            "model": stamp["model"],
            "dimensions": stamp["dimensions"],
            "embedded_at": embedded_at,
        }
        for chunk in chunks
    ]


@functools.lru_cache(maxsize=4096)  # a write asks for its tombstone and chunk 0 up to three times
def point_id(tenant: str, collection: str, doc_id: str, chunk_index: int) -> str:
    """UUIDv5 of the four parts, joined as a JSON array so no two tuples share a name. A physical
    collection (worker/reembed/names.py) counts as its logical one: ids are equal in each."""
    key = [tenant, logical_name(collection), doc_id, chunk_index]
    return str(uuid.uuid5(NAMESPACE, json.dumps(key)))


def tombstone_id(tenant: str, collection: str, doc_id: str) -> str:
    return point_id(tenant, collection, doc_id, TOMBSTONE_INDEX)


@dataclass(frozen=True)
class ChunkVector:
    chunk_index: int
    text: str
    content_hash: str
    vector: list[float]
    sparse: dict[int, float] | None = None


@dataclass
class DocSummary:
    """What one document's points hold: versions, chunk indexes and the chunk counts they claim."""

    versions: set[int] = field(default_factory=set)
    chunk_indexes: set[int] = field(default_factory=set)
    chunk_counts: set[int] = field(default_factory=set)

    def is_complete(self, version: int, chunk_count: int) -> bool:
        """Exactly the chunks 0..chunk_count-1 of `version`, nothing else."""
        return (
            self.versions == {version}
            and self.chunk_counts == {chunk_count}
            and self.chunk_indexes == set(range(chunk_count))
        )


@dataclass(frozen=True)
class Hit:
    doc_id: str
    tenant: str
    chunk_index: int
    score: float
    version: int
    text: str | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class StoredPoint:
    """One chunk point as stored, for checks and the reconciler."""

    id: str
    payload: dict[str, Any]
    vector: list[float] | None


@dataclass(frozen=True)
class DocWrite:
    """One document's write, for `write_many`."""

    tenant: str
    doc_id: str
    version: int
    chunks: list[ChunkVector]
    meta: dict[str, Any]


def write_many(
    store: Any, collection: str, docs: list[DocWrite], *, model: str, dimensions: int
) -> list[bool]:
    """`write_document` of each of `docs` (distinct documents of one collection): in one call
    where the store has `write_documents` (Qdrant Edge), else one by one. Raises what a write
    raises; the caller then writes one by one to learn whose it was."""
    batched = getattr(store, "write_documents", None)
    if batched is not None and len(docs) > 1 and len({(d.tenant, d.doc_id) for d in docs}) == len(docs):
        return list(batched(collection, docs, model=model, dimensions=dimensions))
    return [
        store.write_document(
            collection,
            d.tenant,
            d.doc_id,
            d.version,
            d.chunks,
            meta=d.meta,
            model=model,
            dimensions=dimensions,
        )
        for d in docs
    ]


class VectorStore(Protocol):
    """Raises StoreUnavailable (a RetryLater) when the store does not answer, and StoreRejected
    (a GiveUp) when it refuses one document's write or delete."""

    def ensure_collection(
        self, collection: str, dimensions: int, *, sparse: bool = False, alias: str | None = None
    ) -> None:
        """Create the collection if missing. With `alias`: when the collection is first seen,
        that alias is pointed at it unless a collection or an alias of that name exists."""
        ...

    def write_document(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        chunks: list[ChunkVector],
        *,
        meta: dict[str, Any],
        model: str,
        dimensions: int,
    ) -> bool: ...

    def delete_document(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        *,
        dimensions: int | None = None,
    ) -> None: ...

    def doc_summaries(self, collection: str) -> dict[tuple[str, str], DocSummary]: ...

    def count(self, collection: str, tenant: str | None = None) -> int: ...

    def search(
        self,
        collection: str,
        vector: list[float],
        *,
        limit: int = 5,
        tenant: str | None = None,
        meta: MetaFilter | None = None,
        sparse: dict[int, float] | None = None,
    ) -> list[Hit]:
        """The `limit` chunks nearest `vector`, best first; never a tombstone. `tenant` and `meta`
        narrow by exact payload match; with `sparse` on a collection that has the sparse vector,
        the dense and the sparse ranking are fused by `rrf`. A missing collection has no hits."""
        ...

    def set_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` (create or switch); every call then resolves it."""
        ...

    def delete_alias(self, alias: str) -> None: ...

    def aliases(self) -> dict[str, str]:
        """{alias: collection}."""
        ...

    def exists(self, collection: str) -> bool:
        """A collection or an alias of this name exists."""
        ...

    def replace_with_alias(self, alias: str, collection: str) -> None:
        """Turn the plain collection named `alias` into an alias of `collection`: the plain one
        is dropped (Qdrant cannot hold both names; worker/reembed/control.py says when)."""
        ...

    def drop_collection(self, collection: str) -> None:
        """Drop a collection no alias points at; a missing one is fine."""
        ...

    def optimize_if_due(self) -> bool:
        """Housekeeping after bulk loads, run from an idle thread; True if it did any."""
        ...

    def close(self) -> None: ...


def fusion_depth(limit: int) -> int:
    """How many candidates each ranking contributes to a fused search of `limit` hits."""
    return max(4 * limit, 20)


def rrf(rankings: list[list[Hit]], *, k: int = RRF_K, limit: int) -> list[Hit]:
    """Reciprocal rank fusion: a chunk scores the sum of 1 / (k + rank) over the rankings it is
    in (rank from 1), and carries that fused score. Ties keep the order of first appearance."""
    fused: dict[tuple[str, str, int], float] = {}
    first: dict[tuple[str, str, int], Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = (hit.tenant, hit.doc_id, hit.chunk_index)
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
            first.setdefault(key, hit)
    order = sorted(fused, key=lambda key: -fused[key])  # stable: ties keep first appearance
    return [replace(first[key], score=fused[key]) for key in order[:limit]]


class SerializedStore:
    """One call at a time into a store that is not thread-safe (qdrant-client local mode)."""

    def __init__(self, store: VectorStore) -> None:
        self.store = store
        self._lock = threading.Lock()

    def ensure_collection(
        self, collection: str, dimensions: int, *, sparse: bool = False, alias: str | None = None
    ) -> None:
        with self._lock:
            self.store.ensure_collection(collection, dimensions, sparse=sparse, alias=alias)

    def write_document(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        chunks: list[ChunkVector],
        *,
        meta: dict[str, Any],
        model: str,
        dimensions: int,
    ) -> bool:
        with self._lock:
            return self.store.write_document(
                collection, tenant, doc_id, version, chunks, meta=meta, model=model, dimensions=dimensions
            )

    def delete_document(
        self, collection: str, tenant: str, doc_id: str, version: int, *, dimensions: int | None = None
    ) -> None:
        with self._lock:
            self.store.delete_document(collection, tenant, doc_id, version, dimensions=dimensions)

    def doc_summaries(self, collection: str) -> dict[tuple[str, str], DocSummary]:
        with self._lock:
            return self.store.doc_summaries(collection)

    def count(self, collection: str, tenant: str | None = None) -> int:
        with self._lock:
            return self.store.count(collection, tenant)

    def search(
        self,
        collection: str,
        vector: list[float],
        *,
        limit: int = 5,
        tenant: str | None = None,
        meta: MetaFilter | None = None,
        sparse: dict[int, float] | None = None,
    ) -> list[Hit]:
        with self._lock:
            return self.store.search(collection, vector, limit=limit, tenant=tenant, meta=meta, sparse=sparse)

    def set_alias(self, alias: str, collection: str) -> None:
        with self._lock:
            self.store.set_alias(alias, collection)

    def delete_alias(self, alias: str) -> None:
        with self._lock:
            self.store.delete_alias(alias)

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return self.store.aliases()

    def exists(self, collection: str) -> bool:
        with self._lock:
            return self.store.exists(collection)

    def replace_with_alias(self, alias: str, collection: str) -> None:
        with self._lock:
            self.store.replace_with_alias(alias, collection)

    def drop_collection(self, collection: str) -> None:
        with self._lock:
            self.store.drop_collection(collection)

    def optimize_if_due(self) -> bool:
        with self._lock:
            return self.store.optimize_if_due()

    def close(self) -> None:
        with self._lock:
            self.store.close()
