"""The Qdrant adapter of the vector-store seam (worker/vectorstore/base.py).

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
version check is then the only guard.

Errors: an unreachable or overloaded store is StoreUnavailable (retry); anything else a write or
a delete raises (a 400, a RecursionError on deeply nested metadata in local mode) is
StoreRejected, for that one document.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from worker.errors import ConfigError, GiveUp, RetryLater, StoreRejected
from worker.vectorstore.base import (
    DENSE,
    SPARSE,
    TOMBSTONE_INDEX,
    ChunkVector,
    check_dimensions,
    chunk_payloads,
    point_id,
    tombstone_id,
)
from worker.vectorstore.qdrant_reads import QdrantReads, match, translated

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

_PROBE = 64  # chunk ids looked up per round when searching a document's older points
_INDEXES: dict[str, models.PayloadSchemaType] = {
    "tenant": models.PayloadSchemaType.KEYWORD,
    "doc_id": models.PayloadSchemaType.KEYWORD,
    "version": models.PayloadSchemaType.INTEGER,
}


@contextmanager
def _refused(action: str) -> Iterator[None]:
    """Outages as `translated`; any other failure becomes StoreRejected (one document's)."""
    try:
        with translated(action):
            yield
    except (RetryLater, GiveUp):
        raise
    except Exception as exc:  # the store refused this document: say why, and only for it
        raise StoreRejected(f"qdrant {action}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _versions(*, lt: int | None = None, lte: int | None = None) -> models.FieldCondition:
    return models.FieldCondition(key="version", range=models.Range(lt=lt, lte=lte))


class QdrantStore(QdrantReads):
    def __init__(self, client: QdrantClient, *, prefix: str = "", store_text: bool = True) -> None:
        super().__init__(client, prefix=prefix)
        self.store_text = store_text
        self._local = type(getattr(client, "_client", None)).__name__ == "QdrantLocal"

    @classmethod
    def from_settings(cls, settings: Settings) -> QdrantStore:
        if settings.qdrant_url:
            key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            client = QdrantClient(url=settings.qdrant_url, api_key=key)
        else:
            path = settings.resolved_qdrant_path()
            if path is None:
                raise ConfigError("neither SIDECAR_QDRANT_URL nor SIDECAR_QDRANT_PATH is set")
            path.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=str(path))
            except RuntimeError as exc:  # the path is locked by another process
                raise ConfigError(
                    f"qdrant_path {path}: {exc}; local mode serves one process, "
                    "set SIDECAR_QDRANT_URL to share a store"
                ) from exc
        return cls(client, prefix=settings.collection_prefix, store_text=settings.store_text)

    # --- collections ----------------------------------------------------------------------

    def ensure_collection(
        self, collection: str, dimensions: int, *, sparse: bool = False, alias: str | None = None
    ) -> None:
        name = self._name(collection)
        if name not in self._ready:
            with translated("ensure_collection"):
                if not self.client.collection_exists(name):
                    self._create(name, dimensions, sparse)
                if alias is not None and not self.exists(alias):
                    self.set_alias(alias, collection)
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
        check_dimensions(chunks, dimensions)
        self.ensure_collection(collection, dimensions, sparse=any(c.sparse for c in chunks))
        stamp = {"model": model, "dimensions": dimensions, "meta": meta}
        try:
            with _refused("write_document"):
                points = self._points(collection, tenant, doc_id, version, chunks, stamp)
                return self._write_points(collection, tenant, doc_id, version, points)
        except StoreRejected:
            self._discard(collection, tenant, doc_id, version, len(chunks))
            raise

    def _discard(self, collection: str, tenant: str, doc_id: str, version: int, count: int) -> None:
        """Best effort after a refused write: remove the points of `version` it may have left
        (local mode can store a payload it then fails to read back), so none is ever served."""
        ids = {point_id(tenant, collection, doc_id, i) for i in range(count)}
        try:
            self._delete_older(self._name(collection), tenant, doc_id, ids, match("version", version))
        except Exception as exc:  # the write's own error is what the caller needs
            log.warning("store.discard_failed collection=%s error=%s", collection, type(exc).__name__)

    def _points(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        chunks: list[ChunkVector],
        stamp: dict[str, Any],
    ) -> list[models.PointStruct]:
        payloads = chunk_payloads(tenant, doc_id, version, chunks, stamp, store_text=self.store_text)
        return [
            models.PointStruct(
                id=point_id(tenant, collection, doc_id, chunk.chunk_index),
                vector=self._vectors(chunk),
                payload=payload,
            )
            for chunk, payload in zip(chunks, payloads, strict=True)
        ]

    def _write_points(
        self, collection: str, tenant: str, doc_id: str, version: int, points: list[models.PointStruct]
    ) -> bool:
        """Steps 1-4 of the module's docstring."""
        name = self._name(collection)
        if self.superseded_by(collection, tenant, doc_id, version):
            return False
        if points:
            guard = self._doc_filter(tenant, doc_id, _versions(lte=version))
            self.client.upsert(name, points, update_filter=guard)
        stale = self._older_ids(collection, tenant, doc_id, below=version, from_index=len(points))
        if stale:
            self._delete_older(name, tenant, doc_id, stale, _versions(lt=version))
        if newer := self.superseded_by(collection, tenant, doc_id, version):
            # A delete or a newer write raced this one: remove what it may have inserted.
            upto, deleted = newer
            older = _versions(lte=upto) if deleted else _versions(lt=upto)
            keep_tombstone = models.HasIdCondition(has_id=[tombstone_id(tenant, collection, doc_id)])
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
        with _refused("delete_document"):
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

    def superseded_by(
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
        must = [match("tenant", tenant), match("doc_id", doc_id), *conditions]
        if only is not None:
            must.append(models.HasIdCondition(has_id=sorted(only)))
        return models.Filter(must=must, must_not=[exclude] if exclude else None)

    def optimize_if_due(self) -> bool:
        """Nothing to do: a server optimises by itself, and local mode has no index to build."""
        return False

    def close(self) -> None:
        self.client.close()
