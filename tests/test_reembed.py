"""Model changes without downtime (worker/reembed/): a collection is an alias over a physical
collection; `reembed` fills a new one under live traffic, switches, rolls back, finalizes —
with a reader querying the collection throughout. Real SQL (SQLite and PostgreSQL), Qdrant
(in-memory local mode and Qdrant Edge) and HTTP to the emulator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from qdrant_client import QdrantClient

from tests.fixtures.runtime import make_settings
from worker import pipeline
from worker.errors import ConfigError
from worker.reembed import control, routes
from worker.runtime import Runtime, build_runtime
from worker.search import Searcher
from worker.sql import schema
from worker.sql.models import Document, ProviderRequest
from worker.sql.reembed_models import Migration, MigrationMark
from worker.tasks import ingest_events
from worker.vectorstore.base import SerializedStore, VectorStore
from worker.vectorstore.edge import EdgeStore
from worker.vectorstore.qdrant import QdrantStore

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

V4 = "documents__text_embedding_v4__1024__1"
V3 = "documents__text_embedding_v3__512__2"
TOPICS = ["green tea", "black coffee", "mountain bikes", "sailing boats", "jazz records"]


def text(i: int, rev: int = 0) -> str:
    return (
        f"note {i} rev {rev}: all about {TOPICS[i % len(TOPICS)]} and more {TOPICS[(i + rev) % len(TOPICS)]}"
    )


def upsert(i: int, version: int, rev: int = 0) -> dict:
    return {"op": "upsert", "doc_id": f"d{i}", "text": text(i, rev), "version": version}


@pytest.fixture()
def runtime(database_url, emulator, tmp_path) -> Iterator[Callable[..., Runtime]]:
    """make(store="memory"|"edge", plain=False) → a runtime whose store threads may share."""
    built: list[Runtime] = []

    def make(store: str = "memory", **overrides) -> Runtime:
        settings = make_settings(
            database_url,
            emulator.url,
            tmp_path,
            reembed_settle_s=0.3,
            reembed_route_refresh_s=0.1,
            **overrides,
        )
        schema.upgrade(settings.resolved_database_url())
        vectors: VectorStore
        if store == "edge":
            vectors = EdgeStore(tmp_path / f"edge{len(built)}")
        else:
            vectors = SerializedStore(QdrantStore(QdrantClient(location=":memory:")))
        rt = build_runtime(settings, store=vectors)
        built.append(rt)
        return rt

    yield make
    for rt in built:
        rt.close()


def drain(rt: Runtime, max_cycles: int = 200) -> None:
    for _ in range(max_cycles):
        if pipeline.run_cycle(rt).idle:
            return
    raise AssertionError("work did not drain")


def migration(rt: Runtime, mig_id: int) -> Migration:
    with rt.sessions() as session:
        found = session.get(Migration, mig_id)
        assert found is not None
        return found


def run_until(rt: Runtime, mig_id: int, state: str, *, live: Callable[[int], None] | None = None) -> int:
    """Advance the migration (with a live change before each step) until it is `state` with its
    store step done; how many steps it took."""
    for n in range(2000):
        if live is not None:
            live(n)
        control.advance(rt, mig_id)
        mig = migration(rt, mig_id)
        if mig.state == state and mig.requested is None:
            return n
        if mig.requested in ("alias", "cleanup"):
            threading.Event().wait(0.05)  # the settle time (0.3 s in these tests)
    raise AssertionError(f"migration never reached {state}: {migration(rt, mig_id).state}")


@dataclass
class Reader:
    """Searches the collection (and counts it through its alias) until stopped."""

    rt: Runtime
    searches: int = 0
    problems: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.searcher = Searcher(self.rt)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                found = self.searcher.search("documents", TOPICS[self.searches % len(TOPICS)], limit=3)
                if not found.hits:
                    self.problems.append(f"search {self.searches}: no hits")
                if self.rt.store.count("documents") == 0:
                    self.problems.append(f"count {self.searches}: the alias is empty")
            except Exception as exc:
                self.problems.append(f"search {self.searches}: {type(exc).__name__}: {exc}")
            self.searches += 1

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def live_traffic(rt: Runtime, start: int = 1000) -> Callable[[int], None]:
    """Every few steps: a new document, an update, a delete; then one pipeline cycle."""

    def step(n: int) -> None:
        if n % 3 == 0:
            events = [upsert(100 + n, start + n), upsert(n % 30, start + n, rev=n)]
            if n % 9 == 0:
                events.append({"op": "delete", "doc_id": f"d{(n * 7) % 30}", "version": start + n})
            ingest_events(rt, events)
        pipeline.run_cycle(rt)

    return step


def settled(rt: Runtime) -> dict[str, tuple[str, int]]:
    with rt.sessions() as session:
        rows = session.execute(sa.select(Document.doc_id, Document.status, Document.version)).all()
    return {r.doc_id: (r.status, r.version) for r in rows}


def assert_holds_sql(rt: Runtime, physical: str) -> None:
    """The physical collection holds every indexed document at its version and no deleted one."""
    held = {doc_id: summary.versions for (_t, doc_id), summary in rt.store.doc_summaries(physical).items()}
    for doc_id, (status, version) in settled(rt).items():
        if status == "indexed":
            assert held.get(doc_id) == {version}, (physical, doc_id, held.get(doc_id), version)
        elif status == "deleted":
            assert doc_id not in held, (physical, doc_id)


def ledger_equals_bill(rt: Runtime, emulator) -> None:
    with rt.sessions() as session:
        billed = session.execute(sa.select(sa.func.sum(ProviderRequest.billed_tokens))).scalar_one()
    assert billed == emulator.bill()["total_tokens"]


@pytest.mark.parametrize("store", ["memory", "edge"])
def test_new_collection_is_an_alias_over_a_physical_collection(runtime, store):
    rt = runtime(store)
    ingest_events(rt, [upsert(i, 1) for i in range(5)])
    drain(rt)
    assert rt.store.aliases() == {"documents": V4}
    assert rt.store.count("documents") == rt.store.count(V4) == 5
    assert routes.resolve(rt, ["documents"])["documents"].physical == V4


@pytest.mark.parametrize("store", ["memory", "edge"])
def test_reembed_under_live_traffic_then_rollback_and_again_finalize(runtime, emulator, store):
    rt = runtime(store)
    ingest_events(rt, [upsert(i, 1) for i in range(30)])
    drain(rt)
    reader = Reader(rt)
    try:
        mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
        assert control.start(rt, "documents", "text-embedding-v3", 512) == mig_id  # a re-run continues
        run_until(rt, mig_id, "switched", live=live_traffic(rt))
        assert rt.store.aliases() == {"documents": V3}
        drain(rt)
        run_until(rt, mig_id, "switched")  # the follower catches up with the last live changes
        assert_holds_sql(rt, V3)
        assert_holds_sql(rt, V4)  # dual write: the old collection stays current for a rollback

        control.request(rt, "documents", "rollback")
        run_until(rt, mig_id, "rolled_back", live=live_traffic(rt, start=5000))
        assert rt.store.aliases() == {"documents": V4}
        assert not rt.store.exists(V3)
        drain(rt)
        assert_holds_sql(rt, V4)

        again = control.start(rt, "documents", "text-embedding-v3", 512)
        run_until(rt, again, "switched", live=live_traffic(rt, start=9000))
        control.request(rt, "documents", "finalize")
        run_until(rt, again, "finalized")
    finally:
        reader.stop()
    physical = migration(rt, again).to_physical
    assert rt.store.aliases() == {"documents": physical}
    assert not rt.store.exists(V4)
    drain(rt)
    assert_holds_sql(rt, physical)
    assert reader.searches > 20
    assert reader.problems == []
    with rt.sessions() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(MigrationMark)).scalar_one() == 0
    ledger_equals_bill(rt, emulator)


@pytest.mark.parametrize("store", ["memory", "edge"])
def test_a_plain_collection_is_switched_over_by_its_first_reembed(runtime, emulator, store):
    rt = runtime(store)
    rt.store.ensure_collection("documents", 1024)  # made by an earlier version: no alias
    ingest_events(rt, [upsert(i, 1) for i in range(20)])
    drain(rt)
    assert rt.store.aliases() == {}
    assert routes.resolve(rt, ["documents"])["documents"].physical == "documents"
    reader = Reader(rt)
    try:
        mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
        mig = migration(rt, mig_id)
        assert (mig.legacy, mig.from_physical) == ("documents", "documents__text_embedding_v4__1024__2")
        run_until(rt, mig_id, "switched", live=live_traffic(rt))
    finally:
        reader.stop()
    assert rt.store.aliases() == {"documents": "documents__text_embedding_v3__512__3"}
    assert reader.problems == []
    drain(rt)
    run_until(rt, mig_id, "switched")
    assert_holds_sql(rt, mig.to_physical)
    assert_holds_sql(rt, mig.from_physical)  # the copy a rollback returns to
    control.request(rt, "documents", "rollback")
    run_until(rt, mig_id, "rolled_back")
    assert rt.store.aliases() == {"documents": mig.from_physical}
    ledger_equals_bill(rt, emulator)


def test_after_the_switch_the_collection_embeds_and_searches_with_its_new_model(runtime, emulator):
    rt = runtime()
    ingest_events(rt, [upsert(i, 1) for i in range(12)])
    ingest_events(rt, [{**upsert(i, 1), "collection": "other"} for i in range(3)])
    drain(rt)
    mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
    run_until(rt, mig_id, "switched")
    with rt.sessions() as session:
        spent = session.execute(
            sa.select(ProviderRequest.model, ProviderRequest.dimensions, sa.func.sum(ProviderRequest.rows))
            .where(ProviderRequest.migration == V3)
            .group_by(ProviderRequest.model, ProviderRequest.dimensions)
        ).all()
    assert [tuple(row) for row in spent] == [("text-embedding-v3", 512, 12)]  # the re-embed's spend

    ingest_events(rt, [upsert(50, 2), {**upsert(51, 2), "collection": "other"}])
    drain(rt)
    found = Searcher(rt).search("documents", "green tea", limit=3)
    assert found.hits and found.request_id is not None
    Searcher(rt).search("other", "green tea", limit=3)
    with rt.sessions() as session:
        rows = session.execute(
            sa.select(ProviderRequest.lane, ProviderRequest.model, ProviderRequest.collection).where(
                ProviderRequest.migration.is_(None),
                ProviderRequest.created_at > migration(rt, mig_id).switched_at,
            )
        ).all()
    seen = {(lane, collection, model) for lane, model, collection in rows}
    assert ("query", "documents", "text-embedding-v3") in seen
    assert ("query", "other", "text-embedding-v4") in seen
    assert {model for lane, _c, model in seen if lane == "realtime"} == {
        "text-embedding-v3",
        "text-embedding-v4",
    }
    assert rt.store.search(V3, [0.1] * 512, limit=50)  # the new document went to the new collection
    assert {h.doc_id for h in rt.store.search(V3, [0.1] * 512, limit=50)} >= {"d50"}
    ledger_equals_bill(rt, emulator)


def test_status_lists_migrations_and_a_second_one_waits_for_the_first(runtime):
    rt = runtime()
    ingest_events(rt, [upsert(i, 1) for i in range(3)])
    drain(rt)
    with pytest.raises(ConfigError, match="already embedded"):
        control.start(rt, "documents", "text-embedding-v4", 1024)
    with pytest.raises(ConfigError, match="no documents"):
        control.start(rt, "nothing", "text-embedding-v3", 512)
    mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
    with pytest.raises(ConfigError, match="finish it first"):
        control.start(rt, "documents", "text-embedding-v4", 512)
    with pytest.raises(ConfigError, match="only a switched one"):
        control.request(rt, "documents", "finalize")
    with rt.sessions() as session:
        (row,) = control.status(session)
    assert row["id"] == mig_id
    assert {k: row[k] for k in ("collection", "from", "to", "state", "done", "total")} == {
        "collection": "documents",
        "from": V4,
        "to": V3,
        "state": "backfilling",
        "done": 0,
        "total": 3,
    }
    run_until(rt, mig_id, "switched")
    with rt.sessions() as session:
        (row,) = control.status(session)
    assert (row["state"], row["done"], row["total"]) == ("switched", 3, 3)


def test_the_worker_loop_alone_carries_a_migration_out(runtime, emulator):
    """As under `sidecar serve`, where `sidecar reembed` cannot open the embedded store: each
    pipeline cycle advances the migration one step, live work going on in the same cycles."""
    rt = runtime("edge")
    ingest_events(rt, [upsert(i, 1) for i in range(25)])
    drain(rt)
    mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
    step = live_traffic(rt)
    for n in range(500):
        step(n)  # ingest and one pipeline cycle, which takes one step of the migration
        mig = migration(rt, mig_id)
        if mig.state == "switched" and mig.requested is None:
            break
        threading.Event().wait(0.02)
    else:
        raise AssertionError(f"the worker loop left the migration {migration(rt, mig_id).state}")
    drain(rt)
    for _ in range(20):  # idle cycles still follow
        pipeline.run_cycle(rt)
    assert_holds_sql(rt, V3)
    assert_holds_sql(rt, V4)
    ledger_equals_bill(rt, emulator)
