"""The vector-store seam: the `VectorStore` Protocol, the values it takes and returns, and the
point ids every implementation uses (worker/vectorstore/qdrant.py is the Qdrant adapter).

Point id: UUIDv5 of tenant, collection, doc_id and chunk index, stable across retries, so every
write is idempotent. A document's tombstone (written by a delete) has chunk index -1.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

NAMESPACE = uuid.UUID("1bae0afb-c502-4426-85c8-38c2ad0ba6eb")  # fixed forever: ids depend on it
DENSE = "dense"
SPARSE = "sparse"
TOMBSTONE_INDEX = -1


def point_id(tenant: str, collection: str, doc_id: str, chunk_index: int) -> str:
    """UUIDv5 of the four parts, joined as a JSON array so no two tuples share a name."""
    return str(uuid.uuid5(NAMESPACE, json.dumps([tenant, collection, doc_id, chunk_index])))


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


class VectorStore(Protocol):
    """Raises StoreUnavailable (a RetryLater) when the store does not answer, and StoreRejected
    (a GiveUp) when it refuses one document's write or delete."""

    def ensure_collection(self, collection: str, dimensions: int, *, sparse: bool = False) -> None: ...

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
        self, collection: str, vector: list[float], *, tenant: str | None = None, limit: int = 5
    ) -> list[Hit]: ...

    def close(self) -> None: ...


class SerializedStore:
    """One call at a time into a store that is not thread-safe (qdrant-client local mode)."""

    def __init__(self, store: VectorStore) -> None:
        self.store = store
        self._lock = threading.Lock()

    def ensure_collection(self, collection: str, dimensions: int, *, sparse: bool = False) -> None:
        with self._lock:
            self.store.ensure_collection(collection, dimensions, sparse=sparse)

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
        self, collection: str, vector: list[float], *, tenant: str | None = None, limit: int = 5
    ) -> list[Hit]:
        with self._lock:
            return self.store.search(collection, vector, tenant=tenant, limit=limit)

    def close(self) -> None:
        with self._lock:
            self.store.close()
