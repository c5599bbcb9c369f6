"""The pipeline in-process on real parts: SQL, local-mode Qdrant, HTTP to the emulator."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from api.emulator import expected_vector
from worker import pipeline
from worker.events import parse_event
from worker.sql import documents
from worker.sql.models import Document, ProviderRequest, RequestItem
from worker.tasks import ingest_events
from worker.vectorstore.base import write_many


def drain(rt, max_cycles: int = 100) -> list[pipeline.Cycle]:
    cycles = []
    for _ in range(max_cycles):
        cycle = pipeline.run_cycle(rt)
        cycles.append(cycle)
        if cycle.idle:
            return cycles
    raise AssertionError("work did not drain")


def upsert(doc_id: str, text: str, version: int | None = None, **extra) -> dict:
    event = {"op": "upsert", "doc_id": doc_id, "text": text, **extra}
    if version is not None:
        event["version"] = version
    return event


def test_events_become_points_with_ledger_rows_equal_to_the_bill(make_runtime, emulator):
    rt = make_runtime()
    outcome = ingest_events(rt, [upsert(f"d{i}", f"document number {i} about tea") for i in range(25)])
    assert outcome == {"accepted": 25}
    drain(rt)

    assert rt.store.count("documents") == 25
    points = rt.store.document_points("documents", "default", "d7")
    assert [p.payload["version"] for p in points] == [0]
    expected = expected_vector(rt.embedder.model, rt.embedder.dimensions, "document number 7 about tea")
    assert max(abs(a - b) for a, b in zip(points[0].vector, expected, strict=True)) < 1e-6
    with rt.sessions() as session:
        rows = session.execute(sa.select(ProviderRequest)).scalars().all()
        items = session.execute(sa.select(sa.func.count()).select_from(RequestItem)).scalar_one()
    assert sorted(r.rows for r in rows) == [5, 10, 10]  # full batches across documents
    assert items == 25
    bill = emulator.bill()
    assert sum(r.billed_tokens for r in rows) == bill["total_tokens"]
    assert {r.provider_request_id for r in rows} == {b["request_id"] for b in bill["requests"]}
    assert all(r.cost_nano_cny == r.billed_tokens * 500 for r in rows)


def test_versions_reorder_and_deletes(make_runtime):
    rt = make_runtime()
    ingest_events(rt, [upsert("a", "second", version=2), upsert("a", "first", version=1)])
    drain(rt)
    assert [p.payload["version"] for p in rt.store.document_points("documents", "default", "a")] == [2]
    ingest_events(rt, [{"op": "delete", "doc_id": "a", "version": 3}, upsert("a", "late", version=2)])
    drain(rt)
    assert rt.store.document_points("documents", "default", "a") == []
    with rt.sessions() as session:
        assert session.execute(sa.select(Document.status)).scalar_one() == "deleted"


def test_unchanged_text_costs_nothing_again(make_runtime, emulator):
    rt = make_runtime()
    ingest_events(rt, [upsert("a", "same words", version=1)])
    drain(rt)
    ingest_events(rt, [upsert("a", "same words", version=2, metadata={"k": 1})])
    drain(rt)
    assert len(emulator.bill()["requests"]) == 1
    points = rt.store.document_points("documents", "default", "a")
    assert points[0].payload["version"] == 2 and points[0].payload["meta"] == {"k": 1}


def test_long_text_is_chunked_and_shrinks(make_runtime):
    rt = make_runtime(chunk_max_tokens=50, chunk_overlap_tokens=0)
    long_text = " ".join(f"Sentence {i} tells a small story." for i in range(60))
    ingest_events(rt, [upsert("long", long_text, version=1)])
    drain(rt)
    first = rt.store.document_points("documents", "default", "long")
    assert len(first) > 3
    ingest_events(rt, [upsert("long", "now short", version=2)])
    drain(rt)
    assert [
        (p.payload["chunk_index"], p.payload["version"])
        for p in rt.store.document_points("documents", "default", "long")
    ] == [(0, 2)]


def test_bad_events_are_rejected_and_the_rest_flow(make_runtime):
    rt = make_runtime()
    outcome = ingest_events(rt, [{"op": "upsert", "doc_id": "x"}, "junk", upsert("ok", "fine")])
    assert outcome == {"rejected": 2, "accepted": 1}
    drain(rt)
    with rt.sessions() as session:
        counts = documents.document_counts(session)
    assert counts["rejected"] == 2 and counts["indexed"] == 1


def test_moderation_rejection_is_narrowed_to_one_document(make_runtime, emulator):
    rt = make_runtime()
    events = [upsert(f"d{i}", f"text {i}") for i in range(10)]
    events[4] = upsert("d4", "bad <<BLOCKED>> words")
    ingest_events(rt, events)
    drain(rt)
    with rt.sessions() as session:
        statuses = dict(session.execute(sa.select(Document.doc_id, Document.status)).all())
        last_error = session.execute(
            sa.select(Document.last_error).where(Document.doc_id == "d4")
        ).scalar_one()
    assert statuses.pop("d4") == "dead"
    assert set(statuses.values()) == {"indexed"}
    assert "DataInspectionFailed" in last_error or "inspection" in last_error.lower()


def test_a_document_the_store_refuses_is_dead_lettered_alone(make_runtime):
    """A write error the store did not expect (here metadata nested deeper than local mode can
    take: a RecursionError) gives up on that document only; the others of the claim are indexed."""
    rt = make_runtime()
    ingest_events(rt, [upsert(f"d{i}", f"text {i}") for i in range(5)])
    deep: dict = {}
    for _ in range(600):
        deep = {"a": deep}
    with rt.sessions.begin() as session:  # as if stored before a depth rule existed
        session.execute(sa.update(Document).where(Document.doc_id == "d2").values(meta=deep))
    drain(rt)
    with rt.sessions() as session:
        statuses = dict(session.execute(sa.select(Document.doc_id, Document.status)).all())
        last_error = session.execute(
            sa.select(Document.last_error).where(Document.doc_id == "d2")
        ).scalar_one()
    assert statuses.pop("d2") == "dead"
    assert set(statuses.values()) == {"indexed"}
    assert "StoreRejected" in last_error or "refused the write" in last_error
    assert rt.store.count("documents") == 4


class _FailsFor:
    """A store whose writes of one document raise an error outside the error tree, as an adapter
    bug or an untranslated library error would."""

    def __init__(self, store: object, doc_id: str) -> None:
        self.store, self.doc_id = store, doc_id

    def write_document(self, collection, tenant, doc_id, *args, **kwargs):
        if doc_id == self.doc_id:
            raise TypeError("not a payload this store can take")
        return self.store.write_document(collection, tenant, doc_id, *args, **kwargs)

    def write_documents(self, collection, docs, **kwargs):  # a lot with that document fails whole
        if any(doc.doc_id == self.doc_id for doc in docs):
            raise TypeError("not a payload this store can take")
        return write_many(self.store, collection, docs, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def test_an_untranslated_store_error_gives_up_on_that_document_only(make_runtime):
    rt = make_runtime()
    ingest_events(rt, [upsert(f"d{i}", f"text {i}") for i in range(5)])
    rt.store = _FailsFor(rt.store, "d3")
    drain(rt)
    with rt.sessions() as session:
        statuses = dict(session.execute(sa.select(Document.doc_id, Document.status)).all())
        last_error = session.execute(
            sa.select(Document.last_error).where(Document.doc_id == "d3")
        ).scalar_one()
    assert statuses.pop("d3") == "dead"
    assert set(statuses.values()) == {"indexed"}
    assert "TypeError" in last_error and "payload" not in last_error


def test_provider_errors_retry_and_never_reach_the_store(make_runtime, emulator):
    rt = make_runtime()
    emulator.configure(error_rate=1.0)
    ingest_events(rt, [upsert("a", "hello")])
    cycle = pipeline.run_cycle(rt)
    assert cycle.failed == 1 and rt.store.count("documents") == 0 if cycle.failed else True
    with rt.sessions() as session:
        doc = session.execute(sa.select(Document)).scalar_one()
        assert doc.status == "pending" and doc.last_error
        session.execute(sa.update(Document).values(lease_until=None))
        session.commit()
    emulator.configure(error_rate=0.0)
    drain(rt)
    with rt.sessions() as session:
        assert session.execute(sa.select(Document.status)).scalar_one() == "indexed"
        statuses = sorted(session.execute(sa.select(ProviderRequest.status)).scalars())
    assert statuses == ["failed", "succeeded"]


def test_parse_event_names_field_and_rule():
    import pytest

    from worker.errors import InvalidEvent

    kwargs = dict(default_collection="c", default_tenant="t", max_text_bytes=10, max_metadata_bytes=20)
    cases = [
        ({"op": "put", "doc_id": "a"}, "op"),
        ({"op": "upsert", "doc_id": ""}, "doc_id"),
        ({"op": "upsert", "doc_id": "a", "text": "x" * 11}, "text"),
        ({"op": "upsert", "doc_id": "a", "text": "x", "version": -1}, "version"),
        ({"op": "upsert", "doc_id": "a", "text": "x", "collection": "a b"}, "collection"),
        ({"op": "upsert", "doc_id": "a", "text": "x", "metadata": {"k": "v" * 30}}, "metadata"),
        ({"op": "delete", "doc_id": "a", "surprise": 1}, "surprise"),
    ]
    for raw, field in cases:
        with pytest.raises(InvalidEvent) as info:
            parse_event(raw, **kwargs)
        assert info.value.field == field
    assert parse_event({"op": "delete", "doc_id": "a"}, **kwargs).collection == "c"


def test_hybrid_output_stores_the_sparse_vector(make_runtime, emulator):
    from api.emulator import expected_sparse

    rt = make_runtime(embedding_api="native", sparse_vectors=True)
    ingest_events(rt, [upsert("h", "green tea and black tea")])
    drain(rt)
    point = rt.store.client.retrieve(
        "documents", [rt.store.document_points("documents", "default", "h")[0].id], with_vectors=True
    )[0]
    sparse = point.vector["sparse"]
    expected = expected_sparse(rt.embedder.model, "green tea and black tea")
    assert dict(zip(sparse.indices, sparse.values, strict=True)) == pytest.approx(
        {e["index"]: e["value"] for e in expected}
    )


def test_sparse_needs_the_native_api():
    from worker.errors import ConfigError
    from worker.settings import Settings

    with pytest.raises(ConfigError, match="SIDECAR_SPARSE_VECTORS"):
        Settings(_env_file=None, sparse_vectors=True).model_spec()


def test_under_a_backlog_a_partial_batch_waits_for_company(make_runtime):
    rt = make_runtime(claim_docs=11, batch_max_delay_s=60.0)
    ingest_events(rt, [upsert(f"d{i:02}", f"note {i}") for i in range(12)])
    drain(rt)
    with rt.sessions() as session:
        sizes = session.execute(
            sa.select(ProviderRequest.rows).order_by(ProviderRequest.created_at)
        ).scalars()
        # A full claim of 11: ten go, one is handed back and leads the next claim with the 12th.
        assert list(sizes) == [10, 2]


def test_a_cycle_that_fails_hands_its_documents_back_at_once(make_runtime, monkeypatch):
    """A cycle that dies after its claim (here: settling fails, as a PostgreSQL deadlock would make
    it) hands its leases back at once (worker/sql/settle.py `release_failed`), attempts counted, so
    the next cycle takes the documents instead of waiting for SIDECAR_LEASE_S to run out."""
    rt = make_runtime()
    ingest_events(rt, [upsert(f"d{i}", f"text {i}") for i in range(3)])

    def deadlock(*args, **kwargs):
        raise sa.exc.OperationalError("UPDATE documents", {}, Exception("deadlock detected"))

    monkeypatch.setattr(pipeline, "finish", deadlock)
    with pytest.raises(sa.exc.OperationalError):
        pipeline.run_cycle(rt)
    with rt.sessions() as session:
        rows = session.execute(sa.select(Document.status, Document.lease_owner, Document.attempts)).all()
    assert rows == [("pending", None, 1)] * 3
    monkeypatch.undo()
    drain(rt)
    with rt.sessions() as session:
        assert set(session.execute(sa.select(Document.status)).scalars()) == {"indexed"}


def test_a_cycle_keeps_several_provider_calls_in_flight(make_runtime, emulator):
    """A cycle of four batches sends them together (SIDECAR_REQUEST_CONCURRENCY): every request
    reached the provider before the first answer came back."""
    rt = make_runtime(request_concurrency=4)
    emulator.configure(latency_ms=500)
    ingest_events(rt, [upsert(f"d{i:02}", f"note {i}") for i in range(40)])
    cycle = pipeline.run_cycle(rt)
    assert (cycle.requests, cycle.rows, cycle.indexed) == (4, 40, 40)
    arrived = sorted(entry["at"] for entry in emulator.log())
    assert len(arrived) == 4 and arrived[-1] - arrived[0] < 0.5
    with rt.sessions() as session:
        assert (
            sum(session.execute(sa.select(ProviderRequest.billed_tokens)).scalars())
            == (emulator.bill()["total_tokens"])
        )


def test_with_a_concurrency_of_one_calls_go_one_after_another(make_runtime, emulator):
    rt = make_runtime(request_concurrency=1)
    emulator.configure(latency_ms=300)
    ingest_events(rt, [upsert(f"d{i:02}", f"note {i}") for i in range(30)])
    assert pipeline.run_cycle(rt).requests == 3
    arrived = sorted(entry["at"] for entry in emulator.log())
    assert all(later - earlier >= 0.3 for earlier, later in itertools.pairwise(arrived))


def test_a_throttled_wave_of_calls_starts_no_more(make_runtime, emulator):
    """Seven batches, four in flight, all throttled: the other three are never sent; every
    document is pending again, none lost, none indexed."""
    rt = make_runtime(request_concurrency=4)
    emulator.configure(throttle_rate=1.0, latency_ms=100)
    ingest_events(rt, [upsert(f"d{i:02}", f"note {i}") for i in range(70)])
    cycle = pipeline.run_cycle(rt)
    assert cycle.requests == 4 and len(emulator.log()) == 4 and cycle.indexed == 0
    with rt.sessions() as session:
        statuses = session.execute(sa.select(Document.status, sa.func.count()).group_by(Document.status))
        assert dict(statuses.all()) == {"pending": 70}
        assert set(session.execute(sa.select(ProviderRequest.status)).scalars()) == {"failed"}


def test_a_spoiling_row_in_one_call_of_a_wave_leaves_the_other_calls_alone(make_runtime, emulator):
    """Three calls at once, one of them refused for one row (moderation): the other two are
    recorded with that wave's results, the refused one is narrowed down to its row, and the
    ledger still equals the bill."""
    rt = make_runtime(request_concurrency=4)
    events = [upsert(f"d{i:02}", f"text {i}") for i in range(25)]
    events[13] = upsert("d13", "bad <<BLOCKED>> words")
    ingest_events(rt, events)
    first = pipeline.run_cycle(rt)
    assert first.requests > 3  # the wave's three, then the narrowing's calls one after another
    drain(rt)
    with rt.sessions() as session:
        statuses = dict(session.execute(sa.select(Document.doc_id, Document.status)).all())
        tokens = sum(session.execute(sa.select(ProviderRequest.billed_tokens)).scalars())
    assert statuses.pop("d13") == "dead"
    assert set(statuses.values()) == {"indexed"}
    assert tokens == emulator.bill()["total_tokens"]
