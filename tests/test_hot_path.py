"""The per-event cost (issue 14): a message is one transaction, a cycle settles its documents in one
statement, and a PostgreSQL connection the server dropped is replaced without a ping per checkout.

Counted from SQLAlchemy's own events on the real databases (SQLite and PostgreSQL), so these are
counts of statements and commits, never timings (those are bench/throughput.py's to print).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event

from worker import pipeline
from worker.sql import accepting, attempts, documents, engines, settle
from worker.sql.models import Document, MessageAttempt, RejectedEvent, SeenEvent
from worker.tasks import ingest_events


@contextmanager
def counting(engine: sa.Engine) -> Iterator[Counter[str]]:
    """Commits and statements (by their first two words) on `engine` while the block runs."""
    seen: Counter[str] = Counter()

    def on_commit(_conn: Any) -> None:
        seen["COMMIT"] += 1

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen[" ".join(statement.split()[:3]).upper()] += 1

    sa_event.listen(engine, "commit", on_commit)
    sa_event.listen(engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        sa_event.remove(engine, "commit", on_commit)
        sa_event.remove(engine, "before_cursor_execute", on_statement)


def upsert(doc_id: str, text: str = "some text", **extra: Any) -> dict[str, Any]:
    return {"op": "upsert", "doc_id": doc_id, "text": text, **extra}


def drain(rt: Any) -> None:
    for _ in range(50):
        if pipeline.run_cycle(rt).idle:
            return
    raise AssertionError("work did not drain")


def test_a_message_of_many_events_is_one_transaction(make_runtime) -> None:
    rt = make_runtime()
    with rt.sessions.begin() as session:
        attempts.message_started(session, "m-1:0")
    message = [upsert(f"d{i}", f"text {i}", version=1) for i in range(30)]
    message += [upsert("d0", "older", version=0), {"op": "upsert"}, upsert("d1", "newer", version=2)]
    with counting(rt.engine) as seen:
        outcome = ingest_events(rt, message, message_id="m-1", attempt_key="m-1:0")
    assert outcome == {"accepted": 31, "stale": 1, "rejected": 1}
    assert seen["COMMIT"] == 1
    with rt.sessions() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Document)).scalar_one() == 30
        assert session.execute(sa.select(Document.text).filter_by(doc_id="d1")).scalar_one() == "newer"
        assert session.execute(sa.select(RejectedEvent.field)).scalar_one() == "doc_id"
        assert session.get(MessageAttempt, "m-1:0") is None  # finished in the same transaction


def test_one_failing_event_rolls_the_message_back_then_goes_event_by_event(make_runtime, monkeypatch) -> None:
    """The one-transaction path and the fallback agree: a failure the database raises midway
    leaves nothing of the first attempt behind (no doubled seen-event or rejected rows)."""
    rt = make_runtime()
    desired = accepting._desired_state
    calls: Counter[str] = Counter()

    def refusing(ev: Any, now: Any) -> Any:  # after the message's keys went in, as a refusal would be
        calls[ev.doc_id] += 1
        if ev.doc_id == "refused":
            raise sa.exc.DataError("INSERT …", {}, ValueError("value out of range"))
        return desired(ev, now)

    monkeypatch.setattr(accepting, "_desired_state", refusing)
    message = [
        upsert("a", event_id="e-a"),
        {"op": "delete"},
        upsert("refused", event_id="e-r"),
        upsert("b"),  # version-less: numbered by its delivery (message id and position)
    ]
    outcome = ingest_events(rt, message, message_id="m-2")
    assert outcome == {"accepted": 2, "rejected": 2}
    assert calls["refused"] == 2  # together, then one by one
    with rt.sessions() as session:
        assert sorted(session.execute(sa.select(Document.doc_id, Document.version)).all()) == [
            ("a", 0),
            ("b", 0),
        ]
        assert session.execute(sa.select(RejectedEvent.field).order_by(RejectedEvent.id)).scalars().all() == [
            "doc_id",
            "event",
        ]
        seen = session.execute(sa.select(SeenEvent.event_id)).scalars().all()
    assert sorted(seen) == ["delivery:m-2:3", "e-a"]  # the refused event's key was rolled back
    monkeypatch.setattr(accepting, "_desired_state", desired)
    assert ingest_events(rt, [upsert("refused", event_id="e-r")]) == {"accepted": 1}  # not a duplicate


def test_a_cycle_settles_its_documents_in_one_statement(make_runtime) -> None:
    rt = make_runtime()
    ingest_events(rt, [upsert(f"d{i:02}", f"note number {i}") for i in range(25)])
    with counting(rt.engine) as seen:
        cycle = pipeline.run_cycle(rt)
    assert cycle.indexed == 25
    assert seen["UPDATE DOCUMENTS SET"] == 2  # the claim, and marking all 25 indexed
    with rt.sessions() as session:
        rows = session.execute(
            sa.select(Document.status, Document.indexed_version, Document.chunk_count, Document.lease_owner)
        ).all()
    assert set(rows) == {("indexed", 0, 1, None)}


def test_settling_hands_back_a_document_that_moved_on_and_those_waiting(make_runtime) -> None:
    rt = make_runtime()
    ingest_events(rt, [upsert(name, version=1) for name in ("kept", "moved", "waiting")])
    with rt.sessions.begin() as session:
        claimed = {d.doc_id: d for d in documents.claim(session, owner="me", limit=10, lease_s=60)}
    ingest_events(rt, [upsert("moved", "a newer text", version=2)])
    with rt.sessions.begin() as session:
        written = [(claimed["kept"], 3), (claimed["moved"], 1)]
        indexed = settle.finish_many(session, written, [claimed["waiting"]], owner="me")
    assert [d.doc_id for d in indexed] == ["kept"]
    with rt.sessions() as session:
        rows = {
            r.doc_id: (r.status, r.version, r.indexed_version, r.chunk_count, r.lease_owner, r.attempts)
            for r in session.execute(sa.select(Document)).scalars()
        }
    assert rows["kept"] == ("indexed", 1, 1, 3, None, 0)
    assert rows["moved"] == ("pending", 2, None, None, None, 0)  # its new version gets its own tries
    assert rows["waiting"] == ("pending", 1, None, None, None, 0)  # handed back: not an attempt


def test_settling_nothing_costs_no_statement(make_runtime) -> None:
    rt = make_runtime()
    with counting(rt.engine) as seen, rt.sessions.begin() as session:
        assert settle.finish_many(session, [], [], owner="me") == []
    assert sum(n for k, n in seen.items() if k != "COMMIT") == 0


def kill_connections(admin_url: str, database: str) -> int:
    """pg_terminate_backend on every other connection to `database`; how many it ended."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    sa.text(
                        "select pg_terminate_backend(pid) from pg_stat_activity "
                        "where datname = :db and pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).all()
            )
    finally:
        admin.dispose()


def test_a_killed_postgres_connection_is_replaced_without_a_ping(database_url, make_runtime) -> None:
    """No `pool_pre_ping`: the pool holds connections that the server then ends (as a restart
    does); the next transactions run on fresh ones without an error or a retry."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has no server to drop a connection")
    rt = make_runtime()
    assert rt.engine.pool._pre_ping is False  # type: ignore[attr-defined]
    ingest_events(rt, [upsert("before")])
    with rt.sessions() as s1, rt.sessions() as s2:  # two pooled connections
        s1.execute(sa.text("select 1"))
        s2.execute(sa.text("select 1"))
    assert kill_connections(database_url, rt.engine.url.database or "") >= 2
    time.sleep(0.2)  # the server's goodbye reaches the sockets

    with counting(rt.engine) as seen:
        assert ingest_events(rt, [upsert("after")]) == {"accepted": 1}
        drain(rt)
    assert "SELECT 1" not in seen  # no ping
    with rt.sessions() as session:
        statuses = dict(session.execute(sa.select(Document.doc_id, Document.status)).all())
    assert statuses == {"before": "indexed", "after": "indexed"}


def test_the_checkout_check_drops_only_closed_connections(postgres_url) -> None:
    engine = engines.make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(sa.text("select pg_backend_pid()")).scalar_one()
        with engine.connect() as conn:  # idle and healthy: kept
            assert conn.execute(sa.text("select pg_backend_pid()")).scalar_one() == first
        kill_connections(postgres_url, engine.url.database or "")
        time.sleep(0.2)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select pg_backend_pid()")).scalar_one() != first
    finally:
        engine.dispose()


def test_a_cycle_lingers_only_while_lone_events_stream_in(monkeypatch) -> None:
    from worker import holdback

    slept: list[float] = []
    monkeypatch.setattr(holdback.time, "sleep", slept.append)
    held = holdback.HeldBack()
    for claimed in (0, 3, 0, 2):  # light load: an event, idle, an event: never waits
        held.linger(0.25)
        held.noted(claimed, full=10)
    assert slept == []
    held.noted(1, full=10)  # a second small cycle in a row: events are streaming in
    held.linger(1.0)
    assert slept == [holdback.HeldBack.LINGER_MAX_S]
    held.noted(10, full=10)  # a backlog fills requests by itself
    held.linger(1.0)
    held.noted(2, full=10)
    held.noted(2, full=10)
    held.linger(0.0)  # SIDECAR_BATCH_MAX_DELAY_S=0: never
    assert slept == [holdback.HeldBack.LINGER_MAX_S]


def test_idle_only_the_first_embedding_loop_polls_and_a_backlog_behind_the_provider_starts_the_others(
    make_runtime, monkeypatch
) -> None:
    """Idle polling costs one loop's transactions however many loops there are; an ingest (the
    wake event) wakes the working loop only; full claims whose cycles wait on the provider bring
    the other loops to work, and claims that are not full send them back to sleep."""
    import threading

    from worker.service import EmbedService

    rt = make_runtime(poll_interval_s=0.05, reconcile_interval_s=0, claim_docs=8)
    cycles: Counter[str] = Counter()
    backlog = threading.Event()

    def cycle(rt: Any, held: Any = None) -> pipeline.Cycle:
        cycles[threading.current_thread().name] += 1
        if not backlog.is_set():
            return pipeline.Cycle(idle=True)
        time.sleep(0.02)  # a provider call: the loop waits, its CPU is idle
        return pipeline.Cycle(claimed=8, requests=1, waited_s=0.02)

    monkeypatch.setattr(pipeline, "run_cycle", cycle)
    service = EmbedService(rt, threads=3, reconcile=False)
    service.start()
    try:
        time.sleep(0.6)  # twelve poll intervals, less than one IDLE_WAIT_S
        quiet = dict(cycles)
        rt.wake.set()
        time.sleep(0.2)
        woken = dict(cycles)
        backlog.set()
        deadline = time.monotonic() + 10
        while service.scale.active < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        busy = dict(cycles)
        backlog.clear()
        while service.scale.active > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        service.stop()
    assert quiet["sidecar-embed-0"] >= 4
    assert quiet.get("sidecar-embed-1", 0) <= 1 and quiet.get("sidecar-embed-2", 0) <= 1  # a first look
    assert woken.get("sidecar-embed-1", 0) <= 1 and woken.get("sidecar-embed-2", 0) <= 1
    assert service.scale.active == 1
    for name in ("sidecar-embed-1", "sidecar-embed-2"):  # joined under the backlog
        assert busy[name] > woken.get(name, 0)
