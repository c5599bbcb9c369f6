"""One contract body for the vector store, on every backend: Qdrant Edge (the embedded default),
local mode (path and :memory:) and a Qdrant server; then what only Edge does, and the import.

The server runs only when SIDECAR_TEST_QDRANT_URL is set.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
import qdrant_edge as qe
from qdrant_client import QdrantClient, models

from tests.fixtures.services import QDRANT_URL, missing_service
from worker.errors import ConfigError, StoreRejected, StoreUnavailable
from worker.runtime import build_runtime, build_store
from worker.settings import Settings
from worker.vectorstore.base import ChunkVector, DocWrite, Hit, SerializedStore, point_id, rrf, write_many
from worker.vectorstore.edge import EdgeStore
from worker.vectorstore.qdrant import QdrantStore

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIMS = 4
COLL = "docs"
BACKENDS = ["edge", "path", "memory", *(["server"] if QDRANT_URL else [])]


def vec(i: int) -> list[float]:
    """Distinct, non-parallel unit-ish vectors."""
    return [1.0, math.sin(i + 1), math.cos(3 * i + 1), 0.1 * i]


def chunks(n: int, tag: str = "", offset: int = 0) -> list[ChunkVector]:
    return [ChunkVector(i, f"{tag} chunk {i}", f"h{tag}{i}", vec(i + offset)) for i in range(n)]


def write(store, doc_id: str, version: int, n: int, *, tenant="t1", offset=0, meta=None) -> bool:
    """Write `n` chunks of `doc_id` at `version`; chunk i gets vec(i + offset)."""
    return store.write_document(
        COLL,
        tenant,
        doc_id,
        version,
        chunks(n, f"v{version}", offset),
        meta={"lang": "en"} if meta is None else meta,
        model="text-embedding-v4",
        dimensions=DIMS,
    )


def make_client(kind: str, tmp_path) -> QdrantClient:
    if kind == "path":
        return QdrantClient(path=str(tmp_path / "qdrant"))
    if kind == "memory":
        return QdrantClient(location=":memory:")
    if QDRANT_URL is None:
        pytest.skip("set SIDECAR_TEST_QDRANT_URL to run against a Qdrant server")
    client = QdrantClient(url=QDRANT_URL, timeout=10)
    try:
        client.get_collections()
    except Exception as exc:
        missing_service("Qdrant", exc)
    return client


@dataclass
class Backend:
    """Opens stores of one backend on one underlying store; `open` gives a fresh adapter (for Edge,
    after closing the last one: a directory serves one open store)."""

    kind: str
    tmp_path: Any
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}_")
    client: QdrantClient | None = None
    opened: list[Any] = field(default_factory=list)

    def open(self, *, store_text: bool = True):
        if self.kind == "edge":
            for old in self.opened:
                old.close()
            store: Any = EdgeStore(self.tmp_path / "edge", prefix=self.prefix, store_text=store_text)
        else:
            if self.client is None:
                self.client = make_client(self.kind, self.tmp_path)
            store = QdrantStore(self.client, prefix=self.prefix, store_text=store_text)
        self.opened.append(store)
        return store

    def dense_params(self, store) -> tuple[int, models.Distance]:
        if self.kind == "edge":
            size, distance, _ = store.vector_params(COLL)
            return size, models.Distance(distance.capitalize())
        dense = store.client.get_collection(store.prefix + COLL).config.params.vectors["dense"]
        return dense.size, dense.distance

    def sparse_of(self, store, pid: str) -> list[tuple[int, float]]:
        if self.kind == "edge":
            [record] = store._shard(store._name(COLL)).retrieve([pid], False, True)
            sparse = record.vector["sparse"]
        else:
            [record] = store.client.retrieve(store.prefix + COLL, [pid], with_vectors=True)
            sparse = record.vector["sparse"]
        return sorted(zip(sparse.indices, sparse.values, strict=True))

    def delete_point(self, store, pid: str) -> None:
        if self.kind == "edge":
            store._shard(store._name(COLL)).update(qe.UpdateOperation.delete_points([pid]))
        else:
            store.client.delete(store.prefix + COLL, points_selector=[pid])

    def close(self) -> None:
        if self.kind == "edge":
            for store in self.opened:
                store.close()
            return
        assert self.client is not None
        for c in self.client.get_collections().collections:
            if c.name.startswith(self.prefix):
                self.client.delete_collection(c.name)
        self.client.close()


# The server backend joins only when SIDECAR_TEST_QDRANT_URL names one.
@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Iterator[Backend]:
    """A backend with a collection prefix of its own; the test's collections are dropped after."""
    b = Backend(request.param, tmp_path)
    yield b
    b.close()


@pytest.fixture()
def store(backend):
    return backend.open()


def versions(store, doc_id: str, tenant: str = "t1") -> list[tuple[int, int]]:
    points = store.document_points(COLL, tenant, doc_id)
    return [(p.payload["chunk_index"], p.payload["version"]) for p in points]


def blind_precheck(store, monkeypatch) -> None:
    """The next write's pre-check sees nothing, as if a newer write or delete landed just after."""
    if isinstance(store, EdgeStore):
        pytest.skip("Edge: one process writes, under one lock; nothing lands after its pre-check")
    real, calls = store.superseded_by, []

    def superseded_by(*args):
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(store, "superseded_by", superseded_by)


def test_point_ids_are_deterministic_and_unambiguous():
    # Pinned: a changed namespace or joining would orphan every stored point.
    assert point_id("default", "documents", "doc-1", 0) == "23d6886e-2265-5831-90b3-c38df7f2e96e"
    assert point_id("t", "c", "d", 0) == point_id("t", "c", "d", 0)
    assert str(uuid.UUID(point_id("t", "c", "d", 0))) == point_id("t", "c", "d", 0)
    assert point_id("a:b", "c", "d", 0) != point_id("a", "b:c", "d", 0)
    assert point_id("t", "c", "d", 1) != point_id("t", "c", "d", 0)
    assert point_id("t1", "c", "d", 0) != point_id("t2", "c", "d", 0)


def test_write_creates_collection_with_payload_contract(store, backend):
    assert write(store, "doc-1", 7, 2, meta={"lang": "en", "doc_id": "spoof", "version": 99})
    assert backend.dense_params(store) == (DIMS, models.Distance.COSINE)

    points = store.document_points(COLL, "t1", "doc-1")
    assert [p.id for p in points] == [point_id("t1", COLL, "doc-1", i) for i in range(2)]
    p = points[1].payload
    assert {k: p[k] for k in ("doc_id", "tenant", "chunk_index", "chunk_count", "version")} == {
        "doc_id": "doc-1",
        "tenant": "t1",
        "chunk_index": 1,
        "chunk_count": 2,
        "version": 7,
    }
    assert p["content_hash"] == "hv71" and p["text"] == "v7 chunk 1"
    assert p["meta"] == {"lang": "en", "doc_id": "spoof", "version": 99}  # nested, so no clash
    assert (p["model"], p["dimensions"]) == ("text-embedding-v4", DIMS)
    assert datetime.fromisoformat(p["embedded_at"]).utcoffset() == timedelta(0)
    norm = math.sqrt(sum(x * x for x in vec(1)))  # cosine collections store unit vectors
    assert points[1].vector == pytest.approx([x / norm for x in vec(1)], rel=1e-4)


def test_redelivered_write_is_idempotent(store):
    assert write(store, "doc-1", 3, 3)
    ids = [p.id for p in store.document_points(COLL, "t1", "doc-1")]
    assert write(store, "doc-1", 3, 3)
    assert [p.id for p in store.document_points(COLL, "t1", "doc-1")] == ids
    assert store.count(COLL) == 3


def test_tenants_are_isolated(store):
    write(store, "doc-1", 1, 2, tenant="acme")
    write(store, "doc-1", 1, 2, tenant="globex", offset=10)
    assert store.count(COLL) == 4
    assert store.count(COLL, "acme") == store.count(COLL, "globex") == 2
    acme_ids = {p.id for p in store.document_points(COLL, "acme", "doc-1")}
    assert acme_ids.isdisjoint(p.id for p in store.document_points(COLL, "globex", "doc-1"))

    hits = store.search(COLL, vec(10), tenant="acme", limit=10)  # globex's exact vector
    assert hits and {h.tenant for h in hits} == {"acme"}
    store.delete_document(COLL, "acme", "doc-1", 1)
    assert store.count(COLL, "acme") == 0 and store.count(COLL, "globex") == 2


def test_chunk_shrink_leaves_only_the_new_version(store):
    write(store, "doc-1", 1, 5)
    assert write(store, "doc-1", 2, 3)
    assert versions(store, "doc-1") == [(0, 2), (1, 2), (2, 2)]
    assert all(p.payload["chunk_count"] == 3 for p in store.document_points(COLL, "t1", "doc-1"))


def test_older_version_never_overwrites_newer(store):
    assert write(store, "doc-1", 2, 3)
    assert not write(store, "doc-1", 1, 5)  # refused, and its extra chunks are not inserted
    assert versions(store, "doc-1") == [(0, 2), (1, 2), (2, 2)]
    assert store.doc_versions(COLL) == {("t1", "doc-1"): 2}


def test_write_that_loses_a_race_cleans_up(store, monkeypatch):
    """An older write that passes the pre-check while a newer one lands removes its own extras."""
    write(store, "doc-1", 5, 2)
    blind_precheck(store, monkeypatch)
    assert not write(store, "doc-1", 4, 4)
    assert versions(store, "doc-1") == [(0, 5), (1, 5)]


def test_an_older_write_keeps_off_newer_chunks_even_without_chunk_0(store, backend):
    """A document whose chunk 0 is gone but whose newer tail chunks are there (a write that
    failed half-way, then cleaned up its own version): an older version writes only where no
    newer point stands, so the newer chunks stay."""
    write(store, "doc-1", 5, 3)
    backend.delete_point(store, point_id("t1", COLL, "doc-1", 0))
    assert write(store, "doc-1", 4, 3)
    assert versions(store, "doc-1") == [(0, 4), (1, 5), (2, 5)]


def test_delete_then_late_older_write_does_not_resurrect(store):
    write(store, "doc-1", 1, 3)
    store.delete_document(COLL, "t1", "doc-1", 3)
    assert store.document_points(COLL, "t1", "doc-1") == []
    assert store.deleted_version(COLL, "t1", "doc-1") == 3
    assert not write(store, "doc-1", 2, 3)  # the late, older upsert
    assert not write(store, "doc-1", 3, 3)  # a delete at v beats a write at v
    assert store.count(COLL) == 0 and store.search(COLL, vec(0)) == []
    assert store.doc_versions(COLL) == {}

    assert write(store, "doc-1", 4, 2)  # a newer version brings it back and retires the tombstone
    assert versions(store, "doc-1") == [(0, 4), (1, 4)]
    assert store.deleted_version(COLL, "t1", "doc-1") is None


def test_delete_that_loses_a_race_leaves_no_chunks(store, monkeypatch):
    """A write whose pre-check ran just before a newer delete landed removes itself after."""
    store.delete_document(COLL, "t1", "doc-1", 2, dimensions=DIMS)  # before any write
    blind_precheck(store, monkeypatch)
    assert not write(store, "doc-1", 1, 3)
    assert store.count(COLL) == 0 and store.deleted_version(COLL, "t1", "doc-1") == 2


def test_writes_of_many_documents_keep_each_ones_version_rule(store):
    """write_many (one call on Edge) gives each document what write_document would: new, a
    redelivery, older than stored, beaten by a delete, fewer chunks than before."""
    write(store, "stored", 5, 2)
    write(store, "shrinks", 1, 3)
    store.delete_document(COLL, "t1", "deleted", 4, dimensions=DIMS)
    lot = [
        DocWrite("t1", "new", 1, chunks(2, "v1"), {"lang": "en"}),
        DocWrite("t1", "stored", 5, chunks(2, "v5"), {"lang": "en"}),  # a redelivery
        DocWrite("t2", "stored", 3, chunks(1, "v3"), {}),  # another tenant's, new
        DocWrite("t1", "deleted", 3, chunks(2, "v3"), {}),  # older than its delete
        DocWrite("t1", "shrinks", 2, chunks(1, "v2"), {"k": 1}),
    ]
    results = write_many(store, COLL, lot, model="text-embedding-v4", dimensions=DIMS)
    assert results == [True, True, True, False, True]
    older = [DocWrite("t1", "stored", 4, chunks(3, "v4"), {}), DocWrite("t1", "new", 1, chunks(1, "v1"), {})]
    assert write_many(store, COLL, older, model="m", dimensions=DIMS) == [False, True]
    assert versions(store, "new") == [(0, 1), (1, 1)]
    assert versions(store, "stored") == [(0, 5), (1, 5)]
    assert versions(store, "stored", tenant="t2") == [(0, 3)]
    assert store.document_points(COLL, "t1", "deleted") == []
    assert versions(store, "shrinks") == [(0, 2)]
    assert store.document_points(COLL, "t1", "shrinks")[0].payload["meta"] == {"k": 1}


def test_delete_keeps_newer_versions_and_older_deletes_do_not_win(store):
    write(store, "doc-1", 5, 2)
    store.delete_document(COLL, "t1", "doc-1", 3)
    assert versions(store, "doc-1") == [(0, 5), (1, 5)]
    store.delete_document(COLL, "t1", "doc-1", 6)
    store.delete_document(COLL, "t1", "doc-1", 4)  # late, older delete
    assert store.deleted_version(COLL, "t1", "doc-1") == 6 and store.count(COLL) == 0


def test_delete_on_a_missing_collection_is_harmless(store):
    store.delete_document("nowhere", "t1", "doc-1", 1)
    assert store.count("nowhere") == 0 and store.document_points("nowhere", "t1", "doc-1") == []


def test_dimension_mismatch_is_a_config_error(store, backend):
    store.ensure_collection(COLL, DIMS)
    store.ensure_collection(COLL, DIMS)  # cached, no error
    with pytest.raises(ConfigError, match=r"4-dimension vectors, not 8"):
        store.ensure_collection(COLL, 8)  # cached
    with pytest.raises(ConfigError, match=r"4-dimension vectors, not 8"):
        backend.open().ensure_collection(COLL, 8)  # fresh


def test_store_text_off_omits_text(backend):
    store = backend.open(store_text=False)
    write(store, "doc-1", 1, 2)
    payloads = [p.payload for p in store.document_points(COLL, "t1", "doc-1")]
    assert payloads and all("text" not in p for p in payloads)
    assert store.search(COLL, vec(0))[0].text is None


def test_search_ranks_an_identical_vector_first(store):
    write(store, "doc-1", 1, 4)
    write(store, "doc-2", 1, 4, offset=4)
    hits = store.search(COLL, vec(6), limit=3)
    assert (hits[0].doc_id, hits[0].chunk_index) == ("doc-2", 2)
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].score > hits[1].score
    assert hits[0].version == 1 and hits[0].text == "v1 chunk 2" and hits[0].meta == {"lang": "en"}


def test_sparse_vectors_are_stored(store, backend):
    store.ensure_collection(COLL, DIMS, sparse=True)
    chunk = ChunkVector(0, "x", "h", vec(0), sparse={3: 0.5, 17: 1.25})
    assert store.write_document(COLL, "t1", "doc-1", 1, [chunk], meta={}, model="m", dimensions=DIMS)
    assert backend.sparse_of(store, point_id("t1", COLL, "doc-1", 0)) == [(3, 0.5), (17, 1.25)]


def test_a_write_the_store_cannot_take_is_store_rejected_for_that_document(store):
    """Metadata nested deeper than the store can handle (a RecursionError in local mode, a 400 from
    a server) fails that one write as StoreRejected (a GiveUp); the next write goes through."""
    deep: dict = {}
    for _ in range(600):
        deep = {"a": deep}
    with pytest.raises(StoreRejected, match="write_document"):
        write(store, "doc-1", 1, 2, meta=deep)
    assert store.document_points(COLL, "t1", "doc-1") == []  # nothing half-written is served
    assert write(store, "doc-2", 1, 2)
    assert versions(store, "doc-2") == [(0, 1), (1, 1)]


def test_unreachable_server_is_store_unavailable():
    client = QdrantClient(url="http://127.0.0.1:9", timeout=1, check_compatibility=False)
    store = QdrantStore(client)
    with pytest.raises(StoreUnavailable):
        store.count(COLL)
    with pytest.raises(StoreUnavailable):
        write(store, "doc-1", 1, 1)


def test_build_store_picks_edge_by_default_local_mode_only_when_a_path_is_set(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, qdrant_url=None, collection_prefix="p_")
    assert settings.resolved_qdrant_path() is None
    store = build_store(settings)
    try:
        assert isinstance(store, EdgeStore)
        write(store, "doc-1", 1, 1)
        assert store.count(COLL) == 1 and (tmp_path / "edge" / "shards" / "p_docs").is_dir()
        assert not (tmp_path / "qdrant").exists()
    finally:
        store.close()
    settings = Settings(_env_file=None, data_dir=tmp_path, edge_path=tmp_path / "e2")
    assert settings.resolved_edge_path() == tmp_path / "e2"


def test_a_runtime_that_fails_to_build_leaves_the_embedded_store_unlocked(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, qdrant_url=None, dashscope_api_key=None)
    with pytest.raises(ConfigError, match="DASHSCOPE_API_KEY"):
        build_runtime(settings)  # the store opens, then the embedder cannot be built
    store = build_store(settings)  # not "open in another process": the failed build closed it
    store.close()


def test_from_settings_uses_local_mode_when_its_path_is_set(tmp_path):
    settings = Settings(
        _env_file=None, data_dir=tmp_path, qdrant_path=tmp_path / "qdrant", collection_prefix="p_"
    )
    store = QdrantStore.from_settings(settings)
    try:
        write(store, "doc-1", 1, 1)
        assert store.count(COLL) == 1 and (tmp_path / "qdrant").is_dir()
        assert store.client.collection_exists("p_" + COLL)
    finally:
        store.close()
    wrapped = build_store(settings)
    try:
        assert isinstance(wrapped, SerializedStore) and wrapped.count(COLL) == 1
    finally:
        wrapped.close()
    with pytest.raises(ConfigError, match="SIDECAR_QDRANT_PATH"):
        QdrantStore.from_settings(Settings(_env_file=None, data_dir=tmp_path))


# --- search: filters, hybrid fusion, aliases ---------------------------------------------------


def hit(doc: str, i: int = 0, score: float = 0.0) -> Hit:
    return Hit(doc_id=doc, tenant="t", chunk_index=i, score=score, version=1, text=None, meta={})


def test_rrf_fuses_by_reciprocal_rank():
    dense = [hit("a", score=0.9), hit("b", score=0.8), hit("c", score=0.1)]
    sparse = [hit("c", score=7.0), hit("b", score=3.0)]
    fused = rrf([dense, sparse], k=60, limit=3)
    assert [h.doc_id for h in fused] == ["c", "b", "a"]
    assert fused[0].score == pytest.approx(1 / 63 + 1 / 61)
    assert fused[1].score == pytest.approx(1 / 62 + 1 / 62)
    assert fused[2].score == pytest.approx(1 / 61)
    assert rrf([dense, sparse], limit=1) == [fused[0]]
    assert rrf([], limit=5) == [] and rrf([[], []], limit=5) == []
    # a tie keeps the order of first appearance
    assert [h.doc_id for h in rrf([[hit("x")], [hit("y")]], limit=2)] == ["x", "y"]


def test_search_filters_on_tenant_and_meta(store):
    write(store, "en", 1, 2, meta={"lang": "en", "year": 2024, "public": True})
    write(store, "de", 1, 2, offset=2, meta={"lang": "de", "year": 2023, "public": False})
    write(store, "other", 1, 2, tenant="t2", offset=4, meta={"lang": "en", "year": 2024, "public": True})
    q = vec(3)
    assert {h.doc_id for h in store.search(COLL, q, limit=10)} == {"en", "de", "other"}
    assert {h.doc_id for h in store.search(COLL, q, limit=10, meta={"lang": "en"})} == {"en", "other"}
    assert {h.doc_id for h in store.search(COLL, q, limit=10, tenant="t1", meta={"lang": "en"})} == {"en"}
    assert {h.doc_id for h in store.search(COLL, q, limit=10, meta={"year": 2023})} == {"de"}
    assert {h.doc_id for h in store.search(COLL, q, limit=10, meta={"public": True})} == {"en", "other"}
    only = store.search(COLL, q, limit=1, meta={"public": False})
    assert [(h.doc_id, h.meta["public"]) for h in only] == [("de", False)]
    assert store.search(COLL, q, limit=10, meta={"lang": "fr"}) == []
    assert store.search(COLL, q, limit=10, meta={"year": "2024"}) == []  # exact: a string is not an int
    assert store.search("nowhere", q) == []


def test_hybrid_search_fuses_dense_and_sparse(store):
    store.ensure_collection(COLL, DIMS, sparse=True)
    docs = {"a": {1: 1.0}, "b": {2: 1.0}, "c": {1: 0.2, 3: 1.0}}
    for n, (doc, terms) in enumerate(docs.items()):
        chunk = ChunkVector(0, doc, f"h{doc}", vec(n), sparse=terms)
        assert store.write_document(COLL, "t1", doc, 1, [chunk], meta={}, model="m", dimensions=DIMS)
    store.delete_document(COLL, "t1", "c", 2)  # a tombstone is never a hit
    dense = store.search(COLL, vec(1), limit=3)
    assert [h.doc_id for h in dense] == ["b", "a"]
    fused = store.search(COLL, vec(1), limit=3, sparse={1: 1.0})  # the sparse ranking: a only
    assert [(h.doc_id, h.score) for h in fused] == [
        ("a", pytest.approx(1 / 62 + 1 / 61)),
        ("b", pytest.approx(1 / 61)),
    ]
    assert fused[0].text == "a" and fused[0].version == 1
    assert store.search(COLL, vec(1), limit=3, sparse={99: 1.0})[0].doc_id == "b"  # sparse finds none


def test_sparse_query_on_a_dense_only_collection_is_dense_search(store):
    write(store, "doc-1", 1, 3)
    plain = store.search(COLL, vec(1), limit=2)
    assert store.search(COLL, vec(1), limit=2, sparse={1: 1.0}) == plain


def test_aliases_resolve_in_every_call(store):
    write(store, "doc-1", 1, 2)
    store.ensure_collection("other", DIMS)
    store.set_alias("live", COLL)
    assert store.aliases() == {"live": COLL}
    assert store.count("live") == 2 and store.search("live", vec(0), limit=1)[0].doc_id == "doc-1"
    store.set_alias("live", "other")  # switch
    assert store.aliases() == {"live": "other"} and store.count("live") == 0
    with pytest.raises(ConfigError):
        store.set_alias("x", "missing")
    store.delete_alias("live")
    store.delete_alias("live")  # gone already: nothing to do
    assert store.aliases() == {}


def test_optimize_if_due_is_safe_on_every_backend(store):
    write(store, "doc-1", 1, 2)
    assert store.optimize_if_due() in (True, False)
    assert store.count(COLL) == 2


# --- Qdrant Edge only -------------------------------------------------------------------------


def edge_write(store: EdgeStore, doc: str, version: int, n: int) -> bool:
    return write(store, doc, version, n, offset=version)


def test_edge_persists_across_reopen_with_tombstones_aliases_and_indexes(tmp_path):
    store = EdgeStore(tmp_path / "edge")
    edge_write(store, "d1", 1, 3)
    edge_write(store, "d2", 2, 2)
    store.delete_document(COLL, "t1", "d2", 3)
    store.set_alias("live", COLL)
    store.close()
    store = EdgeStore(tmp_path / "edge")
    try:
        assert store.count(COLL) == 3 and store.count_all(COLL) == 4  # + the tombstone
        assert store.deleted_version(COLL, "t1", "d2") == 3
        assert store.doc_versions(COLL) == {("t1", "d1"): 1}
        assert store.count("live") == 3 and store.aliases() == {"live": COLL}
        schema = store._shard(COLL).info().payload_schema
        assert {"tenant", "doc_id", "version"} <= set(schema)
        assert not edge_write(store, "d2", 2, 2)  # the tombstone still guards
    finally:
        store.close()


def test_edge_serves_one_process(tmp_path):
    import subprocess
    import sys

    store = EdgeStore(tmp_path / "edge")
    try:
        edge_write(store, "d1", 1, 1)
        with pytest.raises(ConfigError, match="another process"):
            EdgeStore(tmp_path / "edge")
        code = (
            "import sys; from pathlib import Path; from worker.vectorstore.edge import EdgeStore\n"
            "from worker.errors import ConfigError\n"
            "try:\n    EdgeStore(Path(sys.argv[1]))\nexcept ConfigError:\n    sys.exit(3)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "edge")], check=False)
        assert done.returncode == 3
    finally:
        store.close()
    EdgeStore(tmp_path / "edge").close()  # released on close


def test_edge_alias_rules(tmp_path):
    store = EdgeStore(tmp_path / "edge", prefix="p_")
    try:
        store.ensure_collection("v1", DIMS)
        store.ensure_collection("v2", DIMS)
        store.set_alias("docs", "v1")
        assert (tmp_path / "edge" / "aliases.json").read_text().count("p_v1") == 1
        assert not list((tmp_path / "edge").glob(".aliases.json.*"))  # no temp file left
        with pytest.raises(ConfigError, match="shadow"):
            store.set_alias("v1", "v2")
        with pytest.raises(ConfigError, match="still has aliases"):
            store.drop_collection("v1")
        store.delete_alias("docs")
        store.drop_collection("v1")
        assert store.list_collections() == ["v2"]
        with pytest.raises(ConfigError, match="safe"):
            store.count("../escape")
    finally:
        store.close()


def test_edge_optimize_runs_when_due_and_keeps_serving(tmp_path):
    store = EdgeStore(tmp_path / "edge", optimize_after_points=20)
    try:
        for i in range(5):
            edge_write(store, f"d{i}", 1, 3)
        assert store.optimize_if_due() is False  # 15 points written: not due
        for i in range(5, 10):
            edge_write(store, f"d{i}", 1, 3)
        assert store.optimize_if_due() is True
        assert store.optimize_if_due() is False  # the count starts again
        assert store.count(COLL) == 30
        assert store.search(COLL, vec(1), limit=1)[0].score == pytest.approx(1.0, abs=1e-4)
        assert edge_write(store, "d0", 2, 1) and store.count(COLL) == 28
        assert store.optimize(COLL) in (True, False) and store.optimize("nowhere") is False
    finally:
        store.close()


def test_edge_refuses_metadata_it_could_not_replay(tmp_path):
    """Edge 0.9.0 writes deeply nested payloads to its WAL but cannot read them back: refused
    before writing, and the store opens again."""
    store = EdgeStore(tmp_path / "edge")
    deep: dict = {}
    for _ in range(100):
        deep = {"a": deep}
    with pytest.raises(StoreRejected, match="deeper"):
        write(store, "doc-1", 1, 1, meta=deep)
    write(store, "doc-2", 1, 1)
    store.close()
    store = EdgeStore(tmp_path / "edge")
    try:
        assert store.count(COLL) == 1
    finally:
        store.close()


def test_edge_store_is_thread_safe(tmp_path):
    import threading

    store = EdgeStore(tmp_path / "edge")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for v in range(1, 6):
                write(store, f"doc{k}", v, 3, offset=k)
                store.search(COLL, vec(k), limit=3)
                store.count(COLL)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert store.count(COLL) == 24
        assert all(s.is_complete(5, 3) for s in store.doc_summaries(COLL).values())
    finally:
        store.close()


def test_edge_errors_are_translated(tmp_path):
    store = EdgeStore(tmp_path / "edge")
    edge_write(store, "d1", 1, 1)
    store._shard(COLL).close()  # the shard dies under the store
    with pytest.raises(StoreUnavailable):
        store.count(COLL)
    with pytest.raises(StoreUnavailable):
        store.search(COLL, vec(0))
    store.close()


# --- sidecar store import-local ---------------------------------------------------------------


def test_import_local_moves_everything_into_edge(tmp_path, capsys):
    from api.cli import main
    from api.cli.store import import_local

    local = QdrantStore(QdrantClient(path=str(tmp_path / "qdrant")))
    for i in range(30):
        write(local, f"d{i}", 1, 3, offset=i)
    write(local, "gone", 1, 2)
    local.delete_document(COLL, "t1", "gone", 2)
    local.ensure_collection("hybrid", DIMS, sparse=True)
    chunk = ChunkVector(0, "x", "h", vec(0), sparse={3: 0.5, 17: 1.25})
    local.write_document("hybrid", "t1", "s", 1, [chunk], meta={"k": 1}, model="m", dimensions=DIMS)
    local.set_alias("live", COLL)
    before = {p.id: p for p in local.document_points(COLL, "t1", "d7")}
    local.close()

    counts = import_local(tmp_path / "qdrant", tmp_path / "edge", optimize=True)
    assert counts == {COLL: 91, "hybrid": 1}  # 90 chunks + 1 tombstone
    assert f"{COLL}: 91/91" in capsys.readouterr().err  # progress
    edge = EdgeStore(tmp_path / "edge")
    try:
        assert edge.count(COLL) == 90 and edge.deleted_version(COLL, "t1", "gone") == 2
        after = {p.id: p for p in edge.document_points(COLL, "t1", "d7")}
        assert after.keys() == before.keys()
        for pid, p in after.items():
            assert p.payload == before[pid].payload
            assert p.vector == pytest.approx(before[pid].vector, rel=1e-5)
        assert edge.aliases() == {"live": COLL} and edge.count("live") == 90
        [record] = edge._shard("hybrid").retrieve([point_id("t1", "hybrid", "s", 0)], False, True)
        assert sorted(zip(record.vector["sparse"].indices, record.vector["sparse"].values, strict=True)) == [
            (3, 0.5),
            (17, 1.25),
        ]
        assert not write(edge, "gone", 1, 2)  # the tombstone came along and still guards
    finally:
        edge.close()

    # A filled target is refused, then replaced with --force; the CLI reports counts.
    args = ["store", "import-local", "--from", str(tmp_path / "qdrant"), "--to", str(tmp_path / "edge")]
    assert main([*args, "--no-optimize"]) == 2
    assert "already holds points" in capsys.readouterr().err
    assert main([*args, "--no-optimize", "--force"]) == 0
    assert "imported 2 collections, 92 points" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"meta\.json"):
        import_local(tmp_path / "nothing", tmp_path / "edge")


# --- the pipeline and the embedding service on Edge -------------------------------------------


def test_pipeline_indexes_into_edge_and_the_idle_service_optimises(make_runtime):
    import time

    from worker import pipeline
    from worker.service import EmbedService
    from worker.tasks import ingest_events

    rt = make_runtime(store="edge", edge_optimize_after_points=5, edge_optimize_idle_s=0.0)
    events = [{"op": "upsert", "doc_id": f"d{i}", "text": f"edge document {i}"} for i in range(8)]
    assert ingest_events(rt, events) == {"accepted": 8}
    for _ in range(50):
        if pipeline.run_cycle(rt).idle:
            break
    assert isinstance(rt.store, EdgeStore) and rt.store.count("documents") == 8
    assert (
        rt.store.search("documents", rt.store.document_points("documents", "default", "d3")[0].vector)[
            0
        ].doc_id
        == "d3"
    )
    assert rt.store._written  # due: 8 points written, threshold 5
    service = EmbedService(rt, threads=1, reconcile=False)
    service.start()
    try:
        deadline = time.monotonic() + 30
        while any(n >= 5 for n in rt.store._written.values()):
            assert time.monotonic() < deadline, "the idle service did not optimise"
            service._stop.wait(0.05)
    finally:
        service.stop()
    assert rt.store.count("documents") == 8
