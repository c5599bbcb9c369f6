"""Reads and aliases of the Qdrant Edge adapter, and the data directory they share with its writes.

`EdgeStore` (worker/vectorstore/edge.py) adds collections, version-guarded writes, aliases and
optimisation on top. Layout of the data directory:

    .lock            held (flock) while a store is open: one process per directory
    aliases.json     {alias: collection}, replaced atomically
    shards/<name>/   one Edge shard per collection (wal/, segments/, edge_config.json)

Edge raises plain `Exception`s; `translated` sorts them by message into StoreUnavailable (the
shard is closed, busy or the disk failed) and StoreRejected (the input is wrong). Only chunk
points have a dense vector, so reads that filter on it, and every vector query, skip tombstones.
qdrant-edge 0.9.0 turns a Python `True` in `MatchValue` into the integer 1, which never matches a
boolean payload: a boolean `meta` filter is applied here, over a widening window of candidates.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from worker.errors import ConfigError, GiveUp, RetryLater, StoreRejected, StoreUnavailable
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

SCROLL_PAGE = 512
MAX_FLAG_WINDOW = 10_000  # candidates a boolean meta filter looks through at most
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Messages of failures that say nothing about the input: try again later.
_UNAVAILABLE = re.compile(
    r"not initialized|Service runtime error|WouldBlock|No space|Too many open files|"
    r"Input/output|I/O|io error|timed out|Already (mutably )?borrowed",
    re.IGNORECASE,
)


@contextmanager
def translated(action: str, *, rejecting: bool = False) -> Iterator[None]:
    """Edge's exceptions as worker.errors: an outage is StoreUnavailable; anything else is
    StoreRejected when `rejecting` (a write: that document's fault), else StoreUnavailable."""
    try:
        yield
    except (RetryLater, GiveUp, ConfigError):
        raise
    except Exception as exc:
        message = f"edge {action}: {type(exc).__name__}: {str(exc)[:300]}"
        if rejecting and not _UNAVAILABLE.search(str(exc)):
            raise StoreRejected(message) from exc
        raise StoreUnavailable(message) from exc


def match(key: str, value: str | int | bool) -> qe.FieldCondition:
    return qe.FieldCondition(key, match=qe.MatchValue(value))


def chunks_filter(tenant: str | None = None, doc_id: str | None = None) -> qe.Filter:
    """Chunk points (they have a dense vector; tombstones do not), optionally narrowed."""
    must: list[Any] = [qe.HasVectorCondition(DENSE)]
    if tenant is not None:
        must.append(match("tenant", tenant))
    if doc_id is not None:
        must.append(match("doc_id", doc_id))
    return qe.Filter(must=must)


def dense_of(vector: Any) -> list[float] | None:
    found = vector.get(DENSE) if isinstance(vector, dict) else vector
    return [float(x) for x in found] if isinstance(found, list) and found else None


def _hit(payload: dict[str, Any], score: float) -> Hit:
    return Hit(
        doc_id=payload["doc_id"],
        tenant=payload["tenant"],
        chunk_index=payload["chunk_index"],
        score=score,
        version=payload["version"],
        text=payload.get("text"),
        meta=payload.get("meta", {}),
    )


def _write_json_atomically(path: Path, data: Any) -> None:
    """Write beside `path`, fsync, rename over it, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class EdgeReads:
    """The data directory (locked for this process), its shards and alias map, and the reads."""

    def __init__(self, root: Path, *, prefix: str = "") -> None:
        self.root = Path(root)
        self.shards_dir = self.root / "shards"
        self.prefix = prefix
        self._lock = threading.RLock()  # multi-step writes, opening and closing shards, aliases
        self._shards: dict[str, qe.EdgeShard] = {}
        self._ready: dict[str, tuple[int, bool]] = {}  # shard name -> (dimensions, has sparse)
        try:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(self.root / ".lock", "a+")  # noqa: SIM115 - held while open
        except OSError as exc:
            raise ConfigError(f"edge_path {self.root}: {exc}") from exc
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise ConfigError(
                f"edge_path {self.root} is open in another process; the embedded store serves "
                "one process (set SIDECAR_QDRANT_URL to share a store)"
            ) from exc
        self._aliases_path = self.root / "aliases.json"
        self._aliases: dict[str, str] = (
            json.loads(self._aliases_path.read_text()) if self._aliases_path.exists() else {}
        )

    # --- names and shards -------------------------------------------------------------------

    def _name(self, collection: str) -> str:
        """The shard name of a collection or an alias (which resolves to its collection)."""
        name = self.prefix + collection
        name = self._aliases.get(name, name)
        if not SAFE_NAME.match(name):
            raise ConfigError(f"collection name {name!r} is not a safe directory name")
        return name

    def _path(self, name: str) -> Path:
        return self.shards_dir / name

    def _exists(self, name: str) -> bool:
        return name in self._shards or (self._path(name) / "edge_config.json").exists()

    def _shard(self, name: str) -> qe.EdgeShard | None:
        """The open shard of `name`, opened on first use; None if there is no such collection."""
        shard = self._shards.get(name)
        if shard is None and self._exists(name):
            with self._lock, translated("open"):
                shard = self._shards.get(name)
                if shard is None:
                    if not self._exists(name):  # dropped meanwhile
                        return None
                    shard = self._shards[name] = qe.EdgeShard.load(str(self._path(name)))
        return shard

    def list_collections(self) -> list[str]:
        """Collection names (without the prefix) that hold a shard."""
        names = sorted(
            p.name
            for p in self.shards_dir.iterdir()
            if (p / "edge_config.json").exists() and not p.name.startswith(".")  # .retired-*: going
        )
        return [n[len(self.prefix) :] for n in names if n.startswith(self.prefix)]

    def vector_params(self, collection: str) -> tuple[int, str, bool] | None:
        """(dense size, distance, has sparse) as the shard's persisted config says, if it exists."""
        return self._params(self._name(collection))

    def _params(self, name: str) -> tuple[int, str, bool] | None:
        config_file = self._path(name) / "edge_config.json"
        if not config_file.exists():
            return None
        config = json.loads(config_file.read_text())
        dense = (config.get("vectors") or {}).get(DENSE)
        if dense is None:
            raise ConfigError(f"edge collection {name!r} has no named vector {DENSE!r}")
        return int(dense["size"]), str(dense["distance"]), SPARSE in (config.get("sparse_vectors") or {})

    # --- aliases ----------------------------------------------------------------------------

    def aliases(self) -> dict[str, str]:
        """{alias: collection} of this prefix (both without it)."""
        n = len(self.prefix)
        return {a[n:]: c[n:] for a, c in self._aliases.items() if a.startswith(self.prefix)}

    def set_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` (create or switch), persisted atomically."""
        name, target = self.prefix + alias, self._name(collection)
        if not SAFE_NAME.match(name):
            raise ConfigError(f"alias {alias!r} is not a safe name")
        with self._lock:
            if not self._exists(target):
                raise ConfigError(f"alias target {target!r} does not exist")
            if self._exists(name):
                raise ConfigError(f"alias {alias!r} would shadow a collection")
            self._save_aliases({**self._aliases, name: target})

    def exists(self, collection: str) -> bool:
        return self._exists(self._name(collection))

    def delete_alias(self, alias: str) -> None:
        name = self.prefix + alias
        with self._lock:
            if name in self._aliases:
                self._save_aliases({k: v for k, v in self._aliases.items() if k != name})

    def _save_aliases(self, aliases: dict[str, str]) -> None:
        try:
            _write_json_atomically(self._aliases_path, aliases)
        except OSError as exc:
            raise StoreUnavailable(f"edge aliases: {exc}") from exc
        self._aliases = aliases

    # --- reads ------------------------------------------------------------------------------

    def scroll(
        self, collection: str, where: qe.Filter | None = None, *, vectors: bool = False
    ) -> Iterator[qe.Record]:
        """Every point of the collection matching `where` (tombstones too when None)."""
        shard = self._shard(self._name(collection))
        if shard is None:
            return
        offset = None
        while True:
            with translated("scroll"):
                request = qe.ScrollRequest(
                    offset=offset, limit=SCROLL_PAGE, filter=where, with_payload=True, with_vector=vectors
                )
                records, offset = shard.scroll(request)
            yield from records
            if offset is None:
                return

    def document_points(self, collection: str, tenant: str, doc_id: str) -> list[StoredPoint]:
        records = self.scroll(collection, chunks_filter(tenant, doc_id), vectors=True)
        points = [
            StoredPoint(id=str(r.id), payload=r.payload or {}, vector=dense_of(r.vector)) for r in records
        ]
        return sorted(points, key=lambda p: p.payload["chunk_index"])

    def deleted_version(self, collection: str, tenant: str, doc_id: str) -> int | None:
        """The version of the document's tombstone, if it has one."""
        shard = self._shard(self._name(collection))
        if shard is None:
            return None
        with translated("deleted_version"):
            found = shard.retrieve([tombstone_id(tenant, collection, doc_id)], ["version"], False)
        return found[0].payload["version"] if found and found[0].payload else None

    def doc_versions(self, collection: str) -> dict[tuple[str, str], int]:
        """{(tenant, doc_id): newest version} of every document with chunks."""
        return {key: max(summary.versions) for key, summary in self.doc_summaries(collection).items()}

    def doc_summaries(self, collection: str) -> dict[tuple[str, str], DocSummary]:
        """{(tenant, doc_id): what its points hold}, for the reconciler's drift repair."""
        found: dict[tuple[str, str], DocSummary] = {}
        for r in self.scroll(collection, chunks_filter()):
            p = r.payload or {}
            summary = found.setdefault((p["tenant"], p["doc_id"]), DocSummary())
            summary.versions.add(p["version"])
            summary.chunk_indexes.add(p["chunk_index"])
            summary.chunk_counts.add(p["chunk_count"])
        return found

    def count(self, collection: str, tenant: str | None = None) -> int:
        shard = self._shard(self._name(collection))
        if shard is None:
            return 0
        with translated("count"):
            return shard.count(qe.CountRequest(exact=True, filter=chunks_filter(tenant)))

    def count_all(self, collection: str) -> int:
        """Every stored point, tombstones included."""
        shard = self._shard(self._name(collection))
        if shard is None:
            return 0
        with translated("count"):
            return shard.count(qe.CountRequest(exact=True))

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
        shard = self._shard(name)
        if shard is None:
            return []
        must: list[Any] = [match("tenant", tenant)] if tenant is not None else []
        must += [match(f"meta.{k}", v) for k, v in (meta or {}).items() if not isinstance(v, bool)]
        flags = {k: v for k, v in (meta or {}).items() if isinstance(v, bool)}
        where = qe.Filter(must=must) if must else None
        dense = qe.Query.Nearest([float(x) for x in vector], using=DENSE)
        with translated("search"):
            if not (sparse and self._has_sparse(name)):
                return self._query(shard, dense, where, flags, limit)
            depth = fusion_depth(limit)
            sparse_query = qe.Query.Nearest(
                qe.SparseVector(list(sparse), list(sparse.values())), using=SPARSE
            )
            rankings = [
                self._query(shard, dense, where, flags, depth),
                self._query(shard, sparse_query, where, flags, depth),
            ]
        return rrf(rankings, limit=limit)

    def _has_sparse(self, name: str) -> bool:
        if name not in self._ready:
            params = self._params(name)
            return params is not None and params[2]
        return self._ready[name][1]

    @staticmethod
    def _query(
        shard: qe.EdgeShard, query: qe.Query, where: qe.Filter | None, flags: dict[str, bool], limit: int
    ) -> list[Hit]:
        """The best `limit` chunks; boolean `flags` on `meta` checked here, widening the window
        until enough pass, the candidates run out, or MAX_FLAG_WINDOW candidates were looked at."""
        window = limit if not flags else limit * 4
        while True:
            request = qe.QueryRequest(
                limit=window, query=query, filter=where, with_payload=True, with_vector=False
            )
            found = shard.query(request)
            hits = [
                _hit(p.payload, p.score)
                for p in found
                if p.payload
                and not p.payload.get("deleted")
                and all((p.payload.get("meta") or {}).get(k) is v for k, v in flags.items())
            ]
            if len(hits) >= limit or len(found) < window or window >= MAX_FLAG_WINDOW:
                return hits[:limit]
            window = min(window * 4, MAX_FLAG_WINDOW)

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                try:
                    shard.close()  # flushes
                except Exception:  # closing the rest matters more
                    continue
            self._shards.clear()
            self._ready.clear()
            if not self._lockfile.closed:
                fcntl.flock(self._lockfile, fcntl.LOCK_UN)
                self._lockfile.close()
