"""Which model embeds a collection and which physical collection holds it: the
`collection_models` table, read through a per-process cache refreshed every
`SIDECAR_REEMBED_ROUTE_REFRESH_S`, and the store the pipeline and the searcher use through it.

A collection first seen gets a row: the configured model and size, and a physical collection
`{collection}__{model}__{dimensions}__1` with the collection's name as its alias (created with
the collection); a plain collection made before aliases keeps its own name (`physical ==
collection`) until its first re-embed. The pipeline and the searcher address the *physical*
collection of the route they read, never the alias, so a query embedded with one model always
searches vectors of that model, even while a switch happens (worker/reembed/control.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from worker.errors import RetryLater
from worker.reembed import names, parts
from worker.runtime import Runtime
from worker.sql import documents
from worker.sql.engines import insert_ignore
from worker.sql.reembed_models import CollectionModel, Migration
from worker.vectorstore.base import (
    ChunkVector,
    DocSummary,
    DocWrite,
    Hit,
    MetaFilter,
    VectorStore,
    write_many,
)

ACTIVE = ("backfilling", "validating", "switched")


@dataclass(frozen=True)
class Route:
    collection: str
    model: str
    dimensions: int
    physical: str

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.dimensions


class RouteCache:
    """Routes and the ids of migrations with work to do, reloaded when older than `ttl_s`."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.routes: dict[str, Route] = {}
        self.migrations: list[int] = []
        self.idle_until: dict[int, float] = {}  # migration id -> when the worker loop looks again
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def fresh(self, rt: Runtime, *, force: bool = False) -> RouteCache:
        if force or time.monotonic() - self._loaded_at > self.ttl_s:
            with self._lock, rt.sessions.begin() as session:
                rows = session.execute(sa.select(CollectionModel)).scalars()
                self.routes = {
                    r.collection: Route(r.collection, r.model, r.dimensions, r.physical) for r in rows
                }
                self.migrations = list(
                    session.execute(
                        sa.select(Migration.id)
                        .where(sa.or_(Migration.state.in_(ACTIVE), Migration.requested.is_not(None)))
                        .order_by(Migration.id)
                    ).scalars()
                )
                self._loaded_at = time.monotonic()
        return self


def cache(rt: Runtime) -> RouteCache:
    found = rt.variants.get("routes")
    if not isinstance(found, RouteCache):
        found = rt.variants.setdefault("routes", RouteCache(rt.settings.reembed_route_refresh_s))
    return found


def resolve(rt: Runtime, collections: Iterable[str], *, register: bool = True) -> dict[str, Route]:
    """The route of each collection; one first seen is registered (when `register`)."""
    wanted = set(collections)
    known = cache(rt).fresh(rt).routes
    missing = wanted - set(known)
    if missing and register:
        for collection in sorted(missing):
            _register(rt, collection)
        known = cache(rt).fresh(rt, force=True).routes
    return {c: known[c] for c in wanted if c in known}


def _register(rt: Runtime, collection: str) -> None:
    """A row for a collection first seen: its alias's target, a plain collection of that name
    (made before aliases), or a new physical collection of the configured model."""
    model, dimensions, n = rt.embedder.model, rt.embedder.dimensions, 1
    target = rt.store.aliases().get(collection)
    if target is not None:
        physical = target
        parsed = names.parse(target)
        if parsed is not None:
            dimensions, n = parsed[2], parsed[3]
            model = next((m for m in _models() if names.model_part(m) == parsed[1]), model)
    elif rt.store.exists(collection):
        physical = collection
    else:
        physical = names.physical_name(collection, model, dimensions, n)
    row = {
        "collection": collection,
        "model": model,
        "dimensions": dimensions,
        "physical": physical,
        "counter": n,
    }
    with rt.sessions.begin() as session:
        insert_ignore(session, CollectionModel, row)


def _models() -> list[str]:
    from worker.catalog import MODELS

    return list(MODELS)


def for_cycle(rt: Runtime, docs: list[documents.Claimed]) -> tuple[Runtime, list[documents.Claimed]]:
    """The pipeline's hook: the runtime of this cycle's model, writing each collection's
    physical collection; upserts of collections of another model are handed back (the next
    cycles take them), deletes stay whatever their model."""
    routes = resolve(rt, {doc.collection for doc in docs})
    default = Route("", rt.embedder.model, rt.embedder.dimensions, "")
    upserts = [doc for doc in docs if doc.op != "delete"]
    key = routes.get(upserts[0].collection, default).key if upserts else default.key
    keep: list[documents.Claimed] = []
    others: list[documents.Claimed] = []
    for doc in docs:
        same = doc.op == "delete" or routes.get(doc.collection, default).key == key
        (keep if same else others).append(doc)
    if others:
        with rt.sessions.begin() as session:
            for doc in others:
                documents.release(session, doc, owner=rt.owner)
    variant = parts.model_runtime(rt, *key)
    return dataclasses.replace(variant, store=RoutedStore(rt, routes)), keep


def ensure_collection(rt: Runtime, collection: str) -> None:
    """The pipeline's `ensure_collection`: the collection's physical collection and its alias."""
    store = rt.store if isinstance(rt.store, RoutedStore) else RoutedStore(rt, resolve(rt, [collection]))
    store.ensure_collection(collection, rt.embedder.dimensions, sparse=rt.settings.sparse_vectors)


def for_search(rt: Runtime, collection: str) -> Runtime:
    """The searcher's hook: the runtime of the collection's model, searching its physical
    collection (a collection never written to keeps the configured model and its own name)."""
    routes = resolve(rt, [collection], register=False)
    route = routes.get(collection)
    if route is None:
        return rt
    return dataclasses.replace(parts.model_runtime(rt, *route.key), store=RoutedStore(rt, routes))


class RoutedStore:
    """The runtime's store with each routed collection name replaced by its physical collection.

    A write whose route changed since it was read (a re-embed switched the collection) is
    refused with RetryLater: the document is retried on the new route."""

    def __init__(self, rt: Runtime, routes: dict[str, Route]) -> None:
        self.rt = rt
        self.store: VectorStore = rt.store
        self.routes = routes

    def _physical(self, collection: str) -> str:
        route = self.routes.get(collection)
        return route.physical if route is not None else collection

    def _check(self, collection: str) -> str:
        route = self.routes.get(collection)
        if route is None:
            return collection
        now = cache(self.rt).fresh(self.rt).routes.get(collection)
        if now is not None and now.physical != route.physical:
            raise RetryLater(f"collection {collection!r} moved to {now.physical!r}", retry_after_s=0.5)
        return route.physical

    def ensure_collection(
        self, collection: str, dimensions: int, *, sparse: bool = False, alias: str | None = None
    ) -> None:
        route = self.routes.get(collection)
        if route is None:
            self.store.ensure_collection(collection, dimensions, sparse=sparse, alias=alias)
            return
        alias = collection if route.physical != collection else None  # a plain one keeps its name
        self.store.ensure_collection(route.physical, route.dimensions, sparse=sparse, alias=alias)

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
        return self.store.write_document(
            self._check(collection),
            tenant,
            doc_id,
            version,
            chunks,
            meta=meta,
            model=model,
            dimensions=dimensions,
        )

    def write_documents(
        self, collection: str, docs: list[DocWrite], *, model: str, dimensions: int
    ) -> list[bool]:
        return write_many(self.store, self._check(collection), docs, model=model, dimensions=dimensions)

    def delete_document(
        self, collection: str, tenant: str, doc_id: str, version: int, *, dimensions: int | None = None
    ) -> None:
        physical = self._check(collection)
        route = self.routes.get(collection)
        if dimensions is not None and route is not None:
            dimensions = route.dimensions
        self.store.delete_document(physical, tenant, doc_id, version, dimensions=dimensions)

    def doc_summaries(self, collection: str) -> dict[tuple[str, str], DocSummary]:
        return self.store.doc_summaries(self._physical(collection))

    def count(self, collection: str, tenant: str | None = None) -> int:
        return self.store.count(self._physical(collection), tenant)

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
        physical = self._physical(collection)
        return self.store.search(physical, vector, limit=limit, tenant=tenant, meta=meta, sparse=sparse)

    def set_alias(self, alias: str, collection: str) -> None:
        self.store.set_alias(alias, collection)

    def delete_alias(self, alias: str) -> None:
        self.store.delete_alias(alias)

    def aliases(self) -> dict[str, str]:
        return self.store.aliases()

    def exists(self, collection: str) -> bool:
        return self.store.exists(collection)

    def replace_with_alias(self, alias: str, collection: str) -> None:
        self.store.replace_with_alias(alias, collection)

    def drop_collection(self, collection: str) -> None:
        self.store.drop_collection(collection)

    def optimize_if_due(self) -> bool:
        return self.store.optimize_if_due()

    def close(self) -> None:
        """Nothing: the runtime's own store is closed with the runtime."""
