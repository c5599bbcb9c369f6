"""The Qdrant Edge adapter of the vector-store seam (worker/vectorstore/base.py): the embedded
default store, in-process, one Edge shard per collection (layout in worker/vectorstore/edge_reads.py).

Same payload contract, point ids and version rule as the Qdrant adapter
(worker/vectorstore/qdrant.py); writing version v of a document:

1. Pre-check (one `retrieve`: the tombstone, chunk 0 and the points to write): refuse if the
   document's tombstone has a version >= v or its chunk 0 a version > v.
2. Conditional upsert with the condition version <= v: Edge skips an existing point failing it
   and always inserts a missing one; a redelivery of v overwrites itself.
3. Delete the document's points with version < v (Edge has real payload indexes: one filter).

`write_documents` runs these for a cycle's documents with one shard call per step. The pre-check
also looks up every point a document is about to write: a document none of whose points is there
yet (nor its tombstone) goes in an upsert without condition, which is the same write, because the
condition only decides over existing points (that disjunction over the cycle's documents,
checked against every point, was the costliest part of a cycle's write).

Every write runs under one lock and no other process can open the directory, so no write lands
between steps 1 and 3: the Qdrant adapter's post-check (did a delete or a newer write land
meanwhile?) has nothing to find here. A tombstone is a point with no vector at all. Metadata
nested deeper than `MAX_META_DEPTH` is refused before it is written: Edge 0.9.0 accepts it but
cannot replay it from its WAL, so the shard would not open again. Collections and
their optimisation: worker/vectorstore/edge_collections.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import qdrant_edge as qe

from worker.errors import ConfigError, StoreRejected
from worker.vectorstore.base import (
    DENSE,
    SPARSE,
    TOMBSTONE_INDEX,
    ChunkVector,
    DocWrite,
    check_dimensions,
    chunk_payloads,
    point_id,
    tombstone_id,
)
from worker.vectorstore.edge_collections import EdgeCollections
from worker.vectorstore.edge_reads import match, translated

if TYPE_CHECKING:
    from worker.settings import Settings

MAX_META_DEPTH = 64


def _versions(*, lt: int | None = None, lte: int | None = None) -> qe.FieldCondition:
    """A version range (Edge's one numeric range type; the integer index serves it)."""
    return qe.FieldCondition("version", range=qe.RangeFloat(lt=lt, lte=lte))


def _doc_filter(tenant: str, doc_id: str, *conditions: Any, exclude: Any = None) -> qe.Filter:
    return qe.Filter(
        must=[match("tenant", tenant), match("doc_id", doc_id), *conditions],
        must_not=[exclude] if exclude is not None else None,
    )


def _newer(
    found: dict[str, dict[str, Any]], tombstone: str, first: str, version: int
) -> tuple[int, bool] | None:
    """(version, is_delete) of the document's tombstone >= `version` or chunk 0 > `version`
    among `found` (point id -> payload), if any."""
    if tombstone in found and found[tombstone]["version"] >= version:
        return found[tombstone]["version"], True
    if first in found and found[first]["version"] > version:
        return found[first]["version"], False
    return None


def _depth(value: Any) -> int:
    """How deeply dicts and lists nest in `value` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


class EdgeStore(EdgeCollections):
    """`VectorStore` on Qdrant Edge; thread-safe, one process per data directory."""

    def __init__(
        self,
        root: Path,
        *,
        prefix: str = "",
        store_text: bool = True,
        optimize_after_points: int = 10_000,
    ) -> None:
        super().__init__(root, prefix=prefix, optimize_after_points=optimize_after_points)
        self.store_text = store_text

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeStore:
        return cls(
            settings.resolved_edge_path(),
            prefix=settings.collection_prefix,
            store_text=settings.store_text,
            optimize_after_points=settings.edge_optimize_after_points,
        )

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
        doc = DocWrite(tenant, doc_id, version, chunks, meta)
        points = self._prepared("write_document", collection, [doc], model=model, dimensions=dimensions)
        with self._lock:
            try:
                with translated("write_document", rejecting=True):
                    return self._write_many(collection, [doc], points)[0]
            except StoreRejected:
                self._discard(collection, tenant, doc_id, version)
                raise

    def write_documents(
        self, collection: str, docs: list[DocWrite], *, model: str, dimensions: int
    ) -> list[bool]:
        """`write_document` for each of `docs` (distinct documents of one collection), with the
        same results, in at most four shard calls for the lot: the pre-checks in one retrieve, the
        points of documents none of whose points is there yet in one upsert, the others' in one
        whose condition holds each document's own version guard (a point id belongs to one
        document, so the disjunction is exact), the older points in one delete. Raises on the
        first document it refuses (nothing is left of the lot's new points); the caller then
        writes one by one."""
        points = self._prepared("write_documents", collection, docs, model=model, dimensions=dimensions)
        with self._lock:
            try:
                with translated("write_documents", rejecting=True):
                    return self._write_many(collection, docs, points)
            except StoreRejected:
                for doc in docs:
                    self._discard(collection, doc.tenant, doc.doc_id, doc.version)
                raise

    def _prepared(
        self, action: str, collection: str, docs: list[DocWrite], *, model: str, dimensions: int
    ) -> list[list[qe.Point]]:
        """Each document's points, after the checks Edge would not make (sizes, metadata depth)
        and with its collection there."""
        for doc in docs:
            check_dimensions(doc.chunks, dimensions)
            if _depth(doc.meta) > MAX_META_DEPTH:
                raise StoreRejected(f"edge {action}: metadata nests deeper than {MAX_META_DEPTH} levels")
        self.ensure_collection(collection, dimensions, sparse=any(c.sparse for d in docs for c in d.chunks))
        with translated(action, rejecting=True):  # a payload Edge cannot take
            return [
                self._points(
                    collection,
                    d.tenant,
                    d.doc_id,
                    d.version,
                    d.chunks,
                    {"model": model, "dimensions": dimensions, "meta": d.meta},
                )
                for d in docs
            ]

    def _write_many(self, collection: str, docs: list[DocWrite], points: list[list[qe.Point]]) -> list[bool]:
        name = self._name(collection)
        shard = self._shards[name]
        looked = self._looked_up(collection, docs)
        live = [i for i, (newer, _) in enumerate(looked) if newer is None]
        fresh = [point for i in live if not looked[i][1] for point in points[i]]
        if fresh:  # none of these points is there: the version condition has nothing to decide
            shard.update(qe.UpdateOperation.upsert_points(fresh))
        guarded = [i for i in live if looked[i][1] and points[i]]
        if guarded:
            guards: list[Any] = [
                _doc_filter(docs[i].tenant, docs[i].doc_id, _versions(lte=docs[i].version)) for i in guarded
            ]
            lot = [point for i in guarded for point in points[i]]
            shard.update(qe.UpdateOperation.upsert_points(lot, condition=qe.Filter(should=guards)))
        if live:
            stale: list[Any] = [
                _doc_filter(docs[i].tenant, docs[i].doc_id, _versions(lt=docs[i].version)) for i in live
            ]
            shard.update(qe.UpdateOperation.delete_points_by_filter(qe.Filter(should=stale)))
        self._written[name] = self._written.get(name, 0) + sum(len(points[i]) for i in live)
        written = set(live)
        return [i in written for i in range(len(docs))]

    def _discard(self, collection: str, tenant: str, doc_id: str, version: int) -> None:
        """Best effort after a refused write: remove the points of `version` it may have left."""
        try:
            shard = self._shards[self._name(collection)]
            where = _doc_filter(tenant, doc_id, match("version", version), qe.HasVectorCondition(DENSE))
            shard.update(qe.UpdateOperation.delete_points_by_filter(where))
        except Exception:  # the write's own error is what the caller needs
            return

    def _points(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        chunks: list[ChunkVector],
        stamp: dict[str, Any],
    ) -> list[qe.Point]:
        payloads = chunk_payloads(tenant, doc_id, version, chunks, stamp, store_text=self.store_text)
        return [
            qe.Point(point_id(tenant, collection, doc_id, chunk.chunk_index), self._vectors(chunk), payload)
            for chunk, payload in zip(chunks, payloads, strict=True)
        ]

    def delete_document(
        self,
        collection: str,
        tenant: str,
        doc_id: str,
        version: int,
        *,
        dimensions: int | None = None,
    ) -> None:
        """Delete the document's points with version <= `version`, leaving a tombstone; a
        missing collection is left alone unless `dimensions` is given (then it is created)."""
        name = self._name(collection)
        tombstone = tombstone_id(tenant, collection, doc_id)
        if dimensions is not None:
            self.ensure_collection(collection, dimensions)
        with self._lock, translated("delete_document", rejecting=True):
            shard = self._shard(name)
            if shard is None:
                return
            payload = {
                "doc_id": doc_id,
                "tenant": tenant,
                "chunk_index": TOMBSTONE_INDEX,
                "version": version,
                "deleted": True,
            }
            guard = _doc_filter(tenant, doc_id, _versions(lte=version))
            shard.update(
                qe.UpdateOperation.upsert_points([qe.Point(tombstone, {}, payload)], condition=guard)
            )
            chunks = _doc_filter(
                tenant, doc_id, _versions(lte=version), exclude=qe.HasIdCondition({tombstone})
            )
            shard.update(qe.UpdateOperation.delete_points_by_filter(chunks))

    def put_points(self, collection: str, points: list[qe.Point]) -> None:
        """Store points as they are, unguarded (for `sidecar store import-local`)."""
        with self._lock, translated("put_points"):
            shard = self._shard(self._name(collection))
            if shard is None:
                raise ConfigError(f"edge collection {collection!r} does not exist")
            shard.update(qe.UpdateOperation.upsert_points(points))
            name = self._name(collection)
            self._written[name] = self._written.get(name, 0) + len(points)

    @staticmethod
    def _vectors(chunk: ChunkVector) -> dict[str, Any]:
        dense = chunk.vector  # floats already, unless a caller passed another number type
        vectors: dict[str, Any] = {DENSE: dense if type(dense) is list else [float(x) for x in dense]}
        if chunk.sparse:
            vectors[SPARSE] = qe.SparseVector(list(chunk.sparse.keys()), list(chunk.sparse.values()))
        return vectors

    def superseded_by(
        self, collection: str, tenant: str, doc_id: str, version: int
    ) -> tuple[int, bool] | None:
        """(version, is_delete) of a tombstone >= `version` or a chunk 0 > `version`, if any."""
        return self._looked_up(collection, [DocWrite(tenant, doc_id, version, [], {})])[0][0]

    def _looked_up(self, collection: str, docs: list[DocWrite]) -> list[tuple[tuple[int, bool] | None, bool]]:
        """For each of `docs`, in one retrieve: `superseded_by`, and whether its tombstone or any
        of the points it is about to write is there already."""
        shard = self._shard(self._name(collection))
        if shard is None or not docs:
            return [(None, False)] * len(docs)
        ids = [
            (
                tombstone_id(d.tenant, collection, d.doc_id),
                point_id(d.tenant, collection, d.doc_id, 0),
                [point_id(d.tenant, collection, d.doc_id, c.chunk_index) for c in d.chunks],
            )
            for d in docs
        ]
        wanted: list[Any] = list({p for tombstone, first, own in ids for p in (tombstone, first, *own)})
        found = {str(r.id): r.payload or {} for r in shard.retrieve(wanted, ["version"], False)}
        return [
            (_newer(found, tombstone, first, d.version), any(p in found for p in (tombstone, *own)))
            for (tombstone, first, own), d in zip(ids, docs, strict=True)
        ]
