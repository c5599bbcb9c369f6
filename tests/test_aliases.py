"""The store side of aliases (worker/vectorstore/, worker/reembed/names.py), on Qdrant Edge and
qdrant-client local mode (path and :memory:) — and a Qdrant server when SIDECAR_TEST_QDRANT_URL
is set (tests/test_store.py's backends): every read and write resolves an alias, a switch is one
step, a plain collection is replaced by an alias of its name, point ids are equal in every
physical collection of a collection."""

from __future__ import annotations

import pytest
from qdrant_client import QdrantClient

from tests.test_store import backend, chunks, vec  # noqa: F401 - the fixture and its helpers
from worker.errors import ConfigError
from worker.reembed import names
from worker.vectorstore.base import point_id, tombstone_id

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIMS = 4
P1 = "docs__text_embedding_v4__1024__1"
P2 = "docs__text_embedding_v3__512__2"


def test_names_and_point_ids():
    assert names.physical_name("docs", "text-embedding-v4", 1024, 1) == P1
    assert names.parse(P2) == ("docs", "text_embedding_v3", 512, 2)
    assert names.logical_name("a__b__text_embedding_v1__1536__7") == "a__b"
    for plain in ("docs", "docs__x__1__2", "docs__text_embedding_v9__1__2", "docs__text_embedding_v4__1024"):
        assert names.logical_name(plain) == plain
    assert point_id("t", P1, "d", 0) == point_id("t", P2, "d", 0) == point_id("t", "docs", "d", 0)
    assert tombstone_id("t", P1, "d") == tombstone_id("t", "docs", "d")
    assert point_id("t", "docs__x__1__2", "d", 0) != point_id("t", "docs", "d", 0)


def write(store, collection: str, doc_id: str, version: int, n: int = 2) -> bool:
    return store.write_document(
        collection, "t1", doc_id, version, chunks(n, f"v{version}"), meta={}, model="m", dimensions=DIMS
    )


def test_every_call_resolves_the_alias(backend):  # noqa: F811 - the fixture
    store = backend.open()
    store.ensure_collection(P1, DIMS)
    store.set_alias("docs", P1)
    assert store.exists("docs") and store.exists(P1) and not store.exists("nothing")
    store.ensure_collection("docs", DIMS)  # through the alias: nothing new
    assert write(store, "docs", "a", 1)
    assert write(store, P1, "b", 1)  # the physical name: the same ids
    assert store.count("docs") == store.count(P1) == 4
    assert set(store.doc_summaries("docs")) == {("t1", "a"), ("t1", "b")}
    assert {h.doc_id for h in store.search("docs", vec(0), limit=10)} == {"a", "b"}
    assert not write(store, "docs", "b", 0)  # the version guard holds across the two names
    store.delete_document("docs", "t1", "a", 2)
    assert store.deleted_version(P1, "t1", "a") == 2  # its tombstone, found under either name
    assert not write(store, P1, "a", 1)  # and it stops a late write under the physical name
    assert store.count("docs") == 2
    ids = {p.id for p in store.document_points("docs", "t1", "b")}
    assert ids == {point_id("t1", "docs", "b", i) for i in range(2)}


def test_a_switch_is_one_step_and_readers_follow(backend):  # noqa: F811
    store = backend.open()
    for physical, n in ((P1, 1), (P2, 3)):
        store.ensure_collection(physical, DIMS)
        for i in range(n):
            write(store, physical, f"d{i}", 1)
    store.set_alias("docs", P1)
    assert store.count("docs") == 2
    calls: list[object] = []
    if backend.kind != "edge":
        client = store.client
        real = client.update_collection_aliases
        client.update_collection_aliases = lambda **kw: calls.append(kw) or real(**kw)  # records, then calls
    store.set_alias("docs", P2)
    assert store.aliases() == {"docs": P2}
    assert store.count("docs") == 6
    if backend.kind != "edge":  # Qdrant: delete and create in one atomic alias update
        (call,) = calls
        ops = call["change_aliases_operations"]
        assert [type(op).__name__ for op in ops] == ["DeleteAliasOperation", "CreateAliasOperation"]
    with pytest.raises(ConfigError):
        store.drop_collection(P2)  # an alias points at it
    store.drop_collection(P1)
    store.drop_collection(P1)  # gone already: fine
    assert not store.exists(P1) and store.count("docs") == 6


def test_a_plain_collection_becomes_an_alias_of_its_name(backend):  # noqa: F811
    store = backend.open()
    store.ensure_collection("docs", DIMS)
    write(store, "docs", "old", 1)
    store.ensure_collection(P2, DIMS)
    write(store, P2, "new", 1)
    with pytest.raises(ConfigError):
        store.set_alias("docs", P2) if backend.kind == "edge" else _plain_alias(store.client, store.prefix)
    store.replace_with_alias("docs", P2)
    assert store.aliases() == {"docs": P2}
    assert {h.doc_id for h in store.search("docs", vec(0), limit=10)} == {"new"}
    assert store.count("docs") == 2
    if backend.kind == "edge":
        assert "docs" not in store.list_collections()
        reopened = backend.open()  # the alias is persisted, the plain shard is gone
        assert reopened.aliases() == {"docs": P2} and reopened.count("docs") == 2


def _plain_alias(client: QdrantClient, prefix: str) -> None:
    """Qdrant refuses an alias named like a collection (why the switch drops it first)."""
    from qdrant_client import models

    op = models.CreateAliasOperation(
        create_alias=models.CreateAlias(collection_name=prefix + P2, alias_name=prefix + "docs")
    )
    try:
        client.update_collection_aliases(change_aliases_operations=[op])
    except Exception as exc:
        raise ConfigError(str(exc)) from exc
