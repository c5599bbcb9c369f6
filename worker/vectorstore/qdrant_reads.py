"""Reads of the Qdrant adapter: searches, counts, aliases and what a collection's points hold.

`QdrantStore` (worker/vectorstore/qdrant.py) adds collections and version-guarded writes on
top. Only chunk points have a dense vector, so reads that filter on it never see a tombstone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from worker.errors import ConfigError, StoreUnavailable
from worker.vectorstore.base import (
    DENSE,
    SPARSE,
    DocSummary,
    Hit,
    MetaFilter,
    StoredPoint,
    fusion_depth,
    rrf,
    tombstone_id,
)


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Connection failures, timeouts, 429 and 5xx become StoreUnavailable; other 4xx are bugs."""
    try:
        yield
    except (ResponseHandlingException, httpx.TransportError) as exc:
        raise StoreUnavailable(f"qdrant {action}: {type(exc).__name__}: {exc}") from exc
    except UnexpectedResponse as exc:
        if exc.status_code is not None and (exc.status_code == 429 or exc.status_code >= 500):
            raise StoreUnavailable(f"qdrant {action}: HTTP {exc.status_code}") from exc
        raise


def match(key: str, value: str | int | bool) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _dense(record: models.Record) -> list[float] | None:
    vector = record.vector.get(DENSE) if isinstance(record.vector, dict) else record.vector
    if not isinstance(vector, list):
        return None
    dense = [x for x in vector if isinstance(x, float)]
    return dense if len(dense) == len(vector) else None  # not a multi-vector


class QdrantReads:
    """Read methods over one client; collection names carry `prefix`."""

    def __init__(self, client: QdrantClient, *, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix
        self._ready: dict[str, tuple[int, bool]] = {}  # name -> (dimensions, has sparse)

    def forget_collections(self) -> None:
        """Forget which collections were seen, after they were dropped behind the store's back."""
        self._ready.clear()

    def _name(self, collection: str) -> str:
        return self.prefix + collection

    def _exists(self, name: str) -> bool:
        return name in self._ready or self.client.collection_exists(name)

    def _chunks_filter(self, tenant: str | None = None, doc_id: str | None = None) -> models.Filter:
        """Chunk points (they have a dense vector; tombstones do not), optionally narrowed."""
        must: list[models.Condition] = [models.HasVectorCondition(has_vector=DENSE)]
        if tenant is not None:
            must.append(match("tenant", tenant))
        if doc_id is not None:
            must.append(match("doc_id", doc_id))
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
        with translated("document_points"):
            if not self._exists(self._name(collection)):
                return []
            records = list(
                self._scroll(collection, self._chunks_filter(tenant, doc_id), with_vectors=[DENSE])
            )
        points = [StoredPoint(id=str(r.id), payload=r.payload or {}, vector=_dense(r)) for r in records]
        return sorted(points, key=lambda p: p.payload["chunk_index"])

    def deleted_version(self, collection: str, tenant: str, doc_id: str) -> int | None:
        """The version of the document's tombstone, if it has one."""
        tombstone = tombstone_id(tenant, collection, doc_id)
        with translated("deleted_version"):
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
        with translated("doc_summaries"):
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
        with translated("count"):
            if not self._exists(self._name(collection)):
                return 0
            return self.client.count(
                self._name(collection), count_filter=self._chunks_filter(tenant), exact=True
            ).count

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
        """Dense search; with `sparse` on a collection that has it, fused with a sparse one."""
        name = self._name(collection)
        must = [match("tenant", tenant)] if tenant is not None else []
        must += [match(f"meta.{key}", value) for key, value in (meta or {}).items()]
        where = models.Filter(must=list(must)) if must else None
        with translated("search"):
            if not self._exists(name):
                return []
            if not (sparse and self._has_sparse(name)):
                return self._query(name, vector, DENSE, where, limit)
            depth = fusion_depth(limit)
            sparse_query = models.SparseVector(indices=list(sparse), values=list(sparse.values()))
            rankings = [
                self._query(name, vector, DENSE, where, depth),
                self._query(name, sparse_query, SPARSE, where, depth),
            ]
        return rrf(rankings, limit=limit)

    def _has_sparse(self, name: str) -> bool:
        if name in self._ready:
            return self._ready[name][1]
        return SPARSE in (self.client.get_collection(name).config.params.sparse_vectors or {})

    def _query(
        self,
        name: str,
        query: list[float] | models.SparseVector,
        using: str,
        where: models.Filter | None,
        limit: int,
    ) -> list[Hit]:
        result = self.client.query_points(
            name, query=query, using=using, query_filter=where, limit=limit, with_payload=True
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
            if p.payload and not p.payload.get("deleted")
        ]

    # --- aliases ----------------------------------------------------------------------------

    def aliases(self) -> dict[str, str]:
        """{alias: collection} of this prefix (both without it)."""
        with translated("aliases"):
            found = self.client.get_aliases().aliases
        n = len(self.prefix)
        return {
            a.alias_name[n:]: a.collection_name[n:]
            for a in found
            if a.alias_name.startswith(self.prefix) and a.collection_name.startswith(self.prefix)
        }

    def set_alias(self, alias: str, collection: str) -> None:
        """Create `alias` or switch it to `collection`, in one atomic alias update."""
        name, target = self._name(alias), self._name(collection)
        with translated("set_alias"):
            if not self.client.collection_exists(target):
                raise ConfigError(f"alias target {target!r} does not exist")
            ops: list[models.AliasOperations] = []
            if alias in self.aliases():
                ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name)))
            ops.append(
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=target, alias_name=name)
                )
            )
            self.client.update_collection_aliases(change_aliases_operations=ops)
        self._ready.clear()

    def exists(self, collection: str) -> bool:
        """A collection or an alias of this name (asked apart: not every version counts aliases)."""
        if collection in self.aliases():
            return True
        with translated("exists"):
            return bool(self.client.collection_exists(self._name(collection)))

    def replace_with_alias(self, alias: str, collection: str) -> None:
        """Drop the plain collection `alias`, then create the alias: two calls, so a reader of
        that name finds no collection between them (README: the one switch of a plain collection)."""
        name, target = self._name(alias), self._name(collection)
        with translated("replace_with_alias"):
            if not self.client.collection_exists(target):
                raise ConfigError(f"alias target {target!r} does not exist")
            if alias not in self.aliases() and self.client.collection_exists(name):
                self.client.delete_collection(name)
        self._ready.clear()
        self.set_alias(alias, collection)

    def drop_collection(self, collection: str) -> None:
        name = self._name(collection)
        if collection in self.aliases().values():
            raise ConfigError(f"qdrant collection {name!r} still has aliases")
        with translated("drop_collection"):
            if self.client.collection_exists(name):
                self.client.delete_collection(name)
        self._ready.pop(name, None)

    def delete_alias(self, alias: str) -> None:
        if alias not in self.aliases():
            return
        op = models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._name(alias)))
        with translated("delete_alias"):
            self.client.update_collection_aliases(change_aliases_operations=[op])
        self._ready.clear()
