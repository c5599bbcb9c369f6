"""One contract body for the vector store, on local mode (path and :memory:) and a Qdrant server.

The server runs only when SIDECAR_TEST_QDRANT_URL is set.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from qdrant_client import QdrantClient, models

from tests.fixtures.services import QDRANT_URL, missing_service
from worker.errors import ConfigError, StoreRejected, StoreUnavailable
from worker.settings import Settings
from worker.vectorstore.base import ChunkVector, point_id
from worker.vectorstore.qdrant import QdrantStore

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIMS = 4
COLL = "docs"


def vec(i: int) -> list[float]:
    """Distinct, non-parallel unit-ish vectors."""
    return [1.0, math.sin(i + 1), math.cos(3 * i + 1), 0.1 * i]


def chunks(n: int, tag: str = "", offset: int = 0) -> list[ChunkVector]:
    return [ChunkVector(i, f"{tag} chunk {i}", f"h{tag}{i}", vec(i + offset)) for i in range(n)]


def write(store: QdrantStore, doc_id: str, version: int, n: int, *, tenant="t1", offset=0, meta=None) -> bool:
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


# The server backend joins only when SIDECAR_TEST_QDRANT_URL names one.
@pytest.fixture(params=["path", "memory", *(["server"] if QDRANT_URL else [])])
def backend(request, tmp_path) -> Iterator[tuple[QdrantClient, str]]:
    """A client and a collection prefix of its own; the test's collections are dropped after."""
    client = make_client(request.param, tmp_path)
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    yield client, prefix
    for c in client.get_collections().collections:
        if c.name.startswith(prefix):
            client.delete_collection(c.name)
    client.close()


@pytest.fixture()
def store(backend) -> QdrantStore:
    client, prefix = backend
    return QdrantStore(client, prefix=prefix)


def versions(store: QdrantStore, doc_id: str, tenant: str = "t1") -> list[tuple[int, int]]:
    points = store.document_points(COLL, tenant, doc_id)
    return [(p.payload["chunk_index"], p.payload["version"]) for p in points]


def blind_precheck(store: QdrantStore, monkeypatch) -> None:
    """The next write's pre-check sees nothing, as if a newer write or delete landed just after."""
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


def test_write_creates_collection_with_payload_contract(store):
    assert write(store, "doc-1", 7, 2, meta={"lang": "en", "doc_id": "spoof", "version": 99})
    info = store.client.get_collection(store.prefix + COLL)
    dense = info.config.params.vectors["dense"]
    assert (dense.size, dense.distance) == (DIMS, models.Distance.COSINE)

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
    client, prefix = backend
    for s in (store, QdrantStore(client, prefix=prefix)):  # cached and fresh
        with pytest.raises(ConfigError, match=r"4-dimension vectors, not 8"):
            s.ensure_collection(COLL, 8)


def test_store_text_off_omits_text(backend):
    client, prefix = backend
    store = QdrantStore(client, prefix=prefix, store_text=False)
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


def test_sparse_vectors_are_stored(store):
    store.ensure_collection(COLL, DIMS, sparse=True)
    chunk = ChunkVector(0, "x", "h", vec(0), sparse={3: 0.5, 17: 1.25})
    assert store.write_document(COLL, "t1", "doc-1", 1, [chunk], meta={}, model="m", dimensions=DIMS)
    ids = [point_id("t1", COLL, "doc-1", 0)]
    [record] = store.client.retrieve(store.prefix + COLL, ids, with_vectors=True)
    sparse = record.vector["sparse"]
    assert sorted(zip(sparse.indices, sparse.values, strict=True)) == [(3, 0.5), (17, 1.25)]


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


def test_from_settings_uses_local_mode_by_default(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, qdrant_url=None, collection_prefix="p_")
    store = QdrantStore.from_settings(settings)
    try:
        write(store, "doc-1", 1, 1)
        assert store.count(COLL) == 1 and (tmp_path / "qdrant").is_dir()
        assert store.client.collection_exists("p_" + COLL)
    finally:
        store.close()
