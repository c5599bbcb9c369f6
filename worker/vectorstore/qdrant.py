"""The vector-store seam and its Qdrant adapter (DESIGN §3).

Every write is idempotent (UUIDv5 point ids) and version-safe, using only the API that local mode
(`QdrantClient(path=...)`, `":memory:"`) and a server (>= 1.16, for `update_filter`) share.

Writing version v of a document:

1. Pre-check (one `retrieve` of two ids): refuse if the document's tombstone has a version >= v or
   its chunk 0 has a version > v.
2. Upsert the chunks with `update_filter` version <= v: an existing point of a newer version is
   skipped, a missing point is inserted, a redelivery of v overwrites itself.
3. Delete the document's points with version < v (stale chunks after a shrink, an old tombstone).
4. Post-check (the same `retrieve`): if a newer write or a delete landed meanwhile, delete what
   step 2 may have inserted, and report that the write did not take effect.

Deleting at version v upserts a tombstone (point id of chunk index -1, no vector, payload
`deleted: true` and `version: v`, guarded by `update_filter` version <= v) and then deletes the
document's other points with version <= v. A delete removes the points the `update_filter` would
have checked, so the tombstone is what stops a late, older upsert from resurrecting the document.
The post-check closes the race of steps 1-4 against a concurrent delete or newer write: whichever
of the two finishes second sees the other and cleans up, as long as the store applies operations
in order (local mode and a single node do; a cluster would need `ordering=strong`, not set here).
A delete at v beats a write at v. A later write of a newer version removes the tombstone in step 3.
With no collection yet, a delete leaves no tombstone unless given `dimensions`; the SQL ledger's
version check (DESIGN §1) is then the only guard.

Tombstones carry no vector, so searches never return them; `count`, `document_points` and
`doc_versions` leave them out too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from worker.errors import ConfigError, StoreUnavailable

if TYPE_CHECKING:
    from worker.settings import Settings

NAMESPACE = uuid.UUID("1bae0afb-c502-4426-85c8-38c2ad0ba6eb")  # fixed forever: ids depend on it
DENSE = "dense"
SPARSE = "sparse"
TOMBSTONE_INDEX = -1
_PROBE = 64  # chunk ids looked up per round when searching a document's older points
_INDEXES: dict[str, models.PayloadSchemaType] = {
    "tenant": models.PayloadSchemaType.KEYWORD,
    "doc_id": models.PayloadSchemaType.KEYWORD,
    "version": models.PayloadSchemaType.INTEGER,
}


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
    """Raises StoreUnavailable (a RetryLater) when the store does not answer."""

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

    def document_points(self, collection: str, tenant: str, doc_id: str) -> list[StoredPoint]: ...

    def deleted_version(self, collection: str, tenant: str, doc_id: str) -> int | None: ...

    def doc_versions(self, collection: str) -> dict[tuple[str, str], int]: ...

    def doc_summaries(self, collection: str) -> dict[tuple[str, str], DocSummary]: ...

    def count(self, collection: str, tenant: str | None = None) -> int: ...

    def search(
        self, collection: str, vector: list[float], *, tenant: str | None = None, limit: int = 5
    ) -> list[Hit]: ...

    def close(self) -> None: ...


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Connection failures, timeouts, 429 and 5xx become StoreUnavailable; other 4xx are bugs."""
    try:
        yield
    except (ResponseHandlingException, httpx.TransportError) as exc:
        raise StoreUnavailable(f"qdrant {action}: {type(exc).__name__}: {exc}") from exc
    except UnexpectedResponse as exc:
        if exc.status_code is not None and (exc.status_code == 429 or exc.status_code >= 500):
            raise StoreUnavailable(f"qdrant {action}: HTTP {exc.status_code}") from exc
        raise


def _match(key: str, value: str | int | bool) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _versions(*, lt: int | None = None, lte: int | None = None) -> models.FieldCondition:
    return models.FieldCondition(key="version", range=models.Range(lt=lt, lte=lte))


class QdrantStore:
    def __init__(self, client: QdrantClient, *, prefix: str = "", store_text: bool = True) -> None:
        self.client = client
        self.prefix = prefix
        self.store_text = store_text
        self._ready: dict[str, tuple[int, bool]] = {}  # name -> (dimensions, has sparse)
        self._local = type(getattr(client, "_client", None)).__name__ == "QdrantLocal"

    @classmethod
    def from_settings(cls, settings: Settings) -> QdrantStore:
        if settings.qdrant_url:
            key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            client = QdrantClient(url=settings.qdrant_url, api_key=key)
        else:
            path = settings.resolved_qdrant_path()
            path.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=str(path))
            except RuntimeError as exc:  # the path is locked by another process
                raise ConfigError(
                    f"qdrant_path {path}: {exc}; local mode serves one process, "
                    "set SIDECAR_QDRANT_URL to share a store"
                ) from exc
        return cls(client, prefix=settings.collection_prefix, store_text=settings.store_text)

    def _name(self, collection: str) -> str:
        return self.prefix + collection

    def _exists(self, name: str) -> bool:
        return name in self._ready or self.client.collection_exists(name)

    # --- collections ----------------------------------------------------------------------

    def ensure_collection(self, collection: str, dimensions: int, *, sparse: bool = False) -> None:
        name = self._name(collection)
        if name not in self._ready:
            with _translated("ensure_collection"):
                if not self.client.collection_exists(name):
                    self._create(name, dimensions, sparse)
                self._ready[name] = self._check(name)
        stored, has_sparse = self._ready[name]
        if stored != dimensions:
            raise ConfigError(
                f"qdrant collection {name!r} holds {stored}-dimension vectors, not {dimensions}: "
                "a changed dimension is a new vector space, so use a new collection"
            )
        if sparse and not has_sparse:
            raise ConfigError(f"qdrant collection {name!r} has no sparse vector {SPARSE!r}")

    def _create(self, name: str, dimensions: int, sparse: bool) -> None:
        try:
            self.client.create_collection(
                name,
                vectors_config={DENSE: models.VectorParams(size=dimensions, distance=models.Distance.COSINE)},
                sparse_vectors_config={SPARSE: models.SparseVectorParams()} if sparse else None,
            )
        except UnexpectedResponse as exc:
            if exc.status_code != 409:  # 409: another worker created it first
                raise

    def _check(self, name: str) -> tuple[int, bool]:
        """(dense size, has sparse) of the collection, after adding missing payload indexes."""
        info = self.client.get_collection(name)
        vectors = info.config.params.vectors
        dense = vectors.get(DENSE) if isinstance(vectors, dict) else None
        if dense is None:
            raise ConfigError(f"qdrant collection {name!r} has no named vector {DENSE!r}")
        for key, schema in _INDEXES.items():
            if key not in (info.payload_schema or {}) and not self._local:  # local mode has none
                self.client.create_payload_index(name, key, field_schema=schema)
        return dense.size, SPARSE in (info.config.params.sparse_vectors or {})

    # --- writes ---------------------------------------------------------------------------

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
        """Write version `version`; False if a newer version or a delete supersedes it."""
        for chunk in chunks:
            if len(chunk.vector) != dimensions:
                raise ValueError(
                    f"chunk {chunk.chunk_index}: vector has {len(chunk.vector)} dimensions, not {dimensions}"
                )
        self.ensure_collection(collection, dimensions, sparse=any(c.sparse for c in chunks))
        name = self._name(collection)
        embedded_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        points = [
            models.PointStruct(
                id=point_id(tenant, collection, doc_id, chunk.chunk_index),
                vector=self._vectors(chunk),
                payload={
                    "doc_id": doc_id,
                    "tenant": tenant,
                    "chunk_index": chunk.chunk_index,
                    "chunk_count": len(chunks),
                    "version": version,
                    "content_hash": chunk.content_hash,
                    **({"text": chunk.text} if self.store_text else {}),
                    "meta": dict(meta),
                    "model": model,
                    "dimensions": dimensions,
                    "embedded_at": embedded_at,
                },
            )
            for chunk in chunks
        ]
        keep_tombstone = models.HasIdCondition(has_id=[tombstone_id(tenant, collection, doc_id)])
        with _translated("write_document"):
            if self._superseded_by(collection, tenant, doc_id, version):
                return False
            if points:
                guard = self._doc_filter(tenant, doc_id, _versions(lte=version))
                self.client.upsert(name, points, update_filter=guard)
            stale = self._older_ids(collection, tenant, doc_id, below=version, from_index=len(chunks))
            if stale:
                self._delete_older(name, tenant, doc_id, stale, _versions(lt=version))
            if newer := self._superseded_by(collection, tenant, doc_id, version):
                # A delete or a newer write raced this one: remove what it may have inserted.
                upto, deleted = newer
                older = _versions(lte=upto) if deleted else _versions(lt=upto)
                self._delete(name, self._doc_filter(tenant, doc_id, older, exclude=keep_tombstone))
                return False
        return True

    def delete_document(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        *,
        dimensions: int | None = None,
    ) -> None:
        """Delete the document's points with version <= `version`, leaving a tombstone.

        Pass `dimensions` to create a missing collection, so that the tombstone lands even when
        the delete arrives before any write; without it a missing collection is left alone.
        """
        name = self._name(collection)
        tombstone = tombstone_id(tenant, collection, doc_id)
        if dimensions is not None:
            self.ensure_collection(collection, dimensions)
        with _translated("delete_document"):
            if not self._exists(name):
                return
            self.client.upsert(
                name,
                [
                    models.PointStruct(
                        id=tombstone,
                        vector={},
                        payload={
                            "doc_id": doc_id,
                            "tenant": tenant,
                            "chunk_index": TOMBSTONE_INDEX,
                            "version": version,
                            "deleted": True,
                        },
                    )
                ],
                update_filter=self._doc_filter(tenant, doc_id, _versions(lte=version)),
            )
            chunks = self._older_ids(collection, tenant, doc_id, below=version + 1, from_index=0)
            chunks.discard(tombstone)
            if chunks:
                self._delete_older(name, tenant, doc_id, chunks, _versions(lte=version))

    def _vectors(self, chunk: ChunkVector) -> dict[str, Any]:
        vectors: dict[str, Any] = {DENSE: chunk.vector}
        if chunk.sparse:
            vectors[SPARSE] = models.SparseVector(
                indices=list(chunk.sparse.keys()), values=list(chunk.sparse.values())
            )
        return vectors

    def _superseded_by(
        self, collection: str, tenant: str, doc_id: str, version: int
    ) -> tuple[int, bool] | None:
        """(version, is_delete) of a tombstone >= `version` or a chunk 0 > `version`, if any."""
        tombstone = tombstone_id(tenant, collection, doc_id)
        first = point_id(tenant, collection, doc_id, 0)
        name = self._name(collection)
        records = self.client.retrieve(name, [tombstone, first], with_vectors=False)
        found = {str(r.id): r.payload or {} for r in records}
        if tombstone in found and found[tombstone]["version"] >= version:
            return found[tombstone]["version"], True
        if first in found and found[first]["version"] > version:
            return found[first]["version"], False
        return None

    def _older_ids(
        self, collection: str, tenant: str, doc_id: str, *, below: int, from_index: int
    ) -> set[str]:
        """Ids of the document's points (chunks from `from_index` on, and its tombstone) with a
        version below `below`, found by id rather than by a filter over the collection.

        A version's chunks are 0..n-1, so every chunk index any version left behind lies in one
        run from `from_index`: probing batches of ids until one finds nothing finds them all.
        (Local mode evaluates a filter against every point in Python; ids are a lookup.)
        """
        name = self._name(collection)
        ask = [tombstone_id(tenant, collection, doc_id)]
        found: set[str] = set()
        start = from_index
        while True:
            batch = {point_id(tenant, collection, doc_id, i) for i in range(start, start + _PROBE)}
            records = self.client.retrieve(
                name, ask + sorted(batch), with_payload=["version"], with_vectors=False
            )
            found |= {str(r.id) for r in records if (r.payload or {}).get("version", below) < below}
            if not any(str(r.id) in batch for r in records):
                return found
            ask, start = [], start + _PROBE

    def _delete_older(
        self, name: str, tenant: str, doc_id: str, ids: set[str], version: models.Condition
    ) -> None:
        """Delete these points of the document if they still match `version`.

        On a server the version condition makes the delete safe against a concurrent newer
        write. Local mode serves one process whose store calls are serialised, so nothing can
        have changed since the ids were read: a plain id delete, without a filter scan.
        """
        if self._local:
            self.client.delete(name, models.PointIdsList(points=sorted(ids)))
        else:
            self._delete(name, self._doc_filter(tenant, doc_id, version, only=ids))

    def _delete(self, name: str, where: models.Filter) -> None:
        self.client.delete(name, models.FilterSelector(filter=where))

    @staticmethod
    def _doc_filter(
        tenant: str,
        doc_id: str,
        *conditions: models.Condition,
        exclude: models.Condition | None = None,
        only: set[str] | None = None,
    ) -> models.Filter:
        must = [_match("tenant", tenant), _match("doc_id", doc_id), *conditions]
        if only is not None:
            must.append(models.HasIdCondition(has_id=sorted(only)))
        return models.Filter(must=must, must_not=[exclude] if exclude else None)

    # --- reads ----------------------------------------------------------------------------

    def _chunks_filter(self, tenant: str | None = None, doc_id: str | None = None) -> models.Filter:
        """Chunk points (they have a dense vector; tombstones do not), optionally narrowed."""
        must: list[models.Condition] = [models.HasVectorCondition(has_vector=DENSE)]
        if tenant is not None:
            must.append(_match("tenant", tenant))
        if doc_id is not None:
            must.append(_match("doc_id", doc_id))
        return models.Filter(must=must)

    def _scroll(
        self,
        collection: str,
        where: models.Filter,
        *,
        with_vectors: bool | list[str],
        payload: bool | list[str] = True,
    ) -> Iterator[models.Record]:
        offset = None
        while True:
            records, offset = self.client.scroll(
                self._name(collection),
                scroll_filter=where,
                limit=512,
                offset=offset,
                with_payload=payload,
                with_vectors=with_vectors,
            )
            yield from records
            if offset is None:
                return

    def document_points(self, collection: str, tenant: str, doc_id: str) -> list[StoredPoint]:
        with _translated("document_points"):
            if not self._exists(self._name(collection)):
                return []
            records = list(
                self._scroll(collection, self._chunks_filter(tenant, doc_id), with_vectors=[DENSE])
            )
        points = [
            StoredPoint(
                id=str(r.id),
                payload=r.payload or {},
                vector=r.vector.get(DENSE) if isinstance(r.vector, dict) else r.vector,
            )
            for r in records
        ]
        return sorted(points, key=lambda p: p.payload["chunk_index"])

    def deleted_version(self, collection: str, tenant: str, doc_id: str) -> int | None:
        """The version of the document's tombstone, if it has one."""
        tombstone = tombstone_id(tenant, collection, doc_id)
        with _translated("deleted_version"):
            if not self._exists(self._name(collection)):
                return None
            found = self.client.retrieve(self._name(collection), [tombstone], with_vectors=False)
        return found[0].payload["version"] if found and found[0].payload else None

    def doc_versions(self, collection: str) -> dict[tuple[str, str], int]:
        """{(tenant, doc_id): newest version} of every document with chunks."""
        return {key: max(summary.versions) for key, summary in self.doc_summaries(collection).items()}

    def doc_summaries(self, collection: str) -> dict[tuple[str, str], DocSummary]:
        """{(tenant, doc_id): what its points hold}, for the reconciler's drift repair."""
        found: dict[tuple[str, str], DocSummary] = {}
        with _translated("doc_summaries"):
            if not self._exists(self._name(collection)):
                return found
            fields = ["tenant", "doc_id", "version", "chunk_index", "chunk_count"]
            for r in self._scroll(collection, self._chunks_filter(), with_vectors=False, payload=fields):
                p = r.payload or {}
                summary = found.setdefault((p["tenant"], p["doc_id"]), DocSummary())
                summary.versions.add(p["version"])
                summary.chunk_indexes.add(p["chunk_index"])
                summary.chunk_counts.add(p["chunk_count"])
        return found

    def count(self, collection: str, tenant: str | None = None) -> int:
        with _translated("count"):
            if not self._exists(self._name(collection)):
                return 0
            return self.client.count(
                self._name(collection), count_filter=self._chunks_filter(tenant), exact=True
            ).count

    def search(
        self, collection: str, vector: list[float], *, tenant: str | None = None, limit: int = 5
    ) -> list[Hit]:
        where = models.Filter(must=[_match("tenant", tenant)]) if tenant is not None else None
        with _translated("search"):
            result = self.client.query_points(
                self._name(collection),
                query=vector,
                using=DENSE,
                query_filter=where,
                limit=limit,
                with_payload=True,
            )
        return [
            Hit(
                doc_id=p.payload["doc_id"],
                tenant=p.payload["tenant"],
                chunk_index=p.payload["chunk_index"],
                score=p.score,
                version=p.payload["version"],
                text=p.payload.get("text"),
                meta=p.payload.get("meta", {}),
            )
            for p in result.points
            if p.payload
        ]

    def close(self) -> None:
        self.client.close()
