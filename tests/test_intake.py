"""Intake of hostile input: every event becomes a document state or a rejection row that both
databases can hold; event ids are scoped by tenant and collection; nothing is retried forever."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sql_errors

from worker import tasks
from worker.errors import InvalidEvent
from worker.events import MAX_VERSION, NAME_PATTERN, escape_unstorable, parse_event
from worker.sql import accepting, attempts, documents
from worker.sql.models import HourlyCounter, MessageAttempt, RejectedEvent, SeenEvent

CAPS = dict(
    default_collection="documents", default_tenant="default", max_text_bytes=1000, max_metadata_bytes=1000
)


def event(**fields: Any) -> dict[str, Any]:
    return {"op": "upsert", "doc_id": "d", "text": "some text", **fields}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    ("raw", "field", "rule"),
    [
        (event(doc_id="a\x00b"), "doc_id", "NUL"),
        (event(doc_id="a\ud800"), "doc_id", "surrogates"),
        (event(text="a\udfff"), "text", "surrogates"),
        (event(text="a\x00"), "text", "NUL"),
        (event(event_id="e\ud800"), "event_id", "surrogates"),
        (event(event_id="e\x00"), "event_id", "NUL"),
        (event(collection="docs\n"), "collection", NAME_PATTERN),
        (event(tenant="t\n"), "tenant", NAME_PATTERN),
        (event(collection="d\ud800"), "collection", NAME_PATTERN),
        (event(version=MAX_VERSION + 1), "version", str(MAX_VERSION)),
        (event(version=2**64), "version", str(MAX_VERSION)),
        (event(version=True), "version", "integer"),
        (event(metadata={"k\ud800": 1}), "metadata", "keys"),
        (event(metadata={"k": ["x", {"deep": "\ud800"}]}), "metadata", "strings"),
        (event(metadata={"k": "\x00"}), "metadata", "strings"),
        (event(metadata={"k": float("nan")}), "metadata", "finite"),
        (event(metadata={"k": [float("inf")]}), "metadata", "finite"),
        (event(metadata={"k": 2**64}), "metadata", "64 bits"),
        (event(metadata={"k": {1, 2}}), "metadata", "plain JSON, not set"),
        (event(metadata={1: "x"}), "metadata", "keys"),
        (event(metadata=nested(33)), "metadata", "nested deeper than 32"),
        (event(metadata={"k": "x" * 2000}), "metadata", "over the cap"),
        (event(**{"": 1}), '""', "unknown field"),
        (event(**{"x\ud800": 1}), "x\\ud800", "unknown field"),
    ],
)
def test_parse_rejects_what_storage_cannot_hold(raw: Any, field: str, rule: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, **CAPS)
    assert info.value.field == field
    assert rule in info.value.rule


def test_parse_accepts_the_edges() -> None:
    assert parse_event(event(version=MAX_VERSION), **CAPS).version == MAX_VERSION
    assert parse_event(event(metadata=nested(32)), **CAPS).metadata == nested(32)
    deep_list: Any = "bottom"
    for _ in range(10_000):  # no recursion: the depth rule answers, the stack never overflows
        deep_list = [deep_list]
    with pytest.raises(InvalidEvent, match="nested deeper"):
        parse_event(event(metadata={"k": deep_list}), **CAPS)
    assert parse_event(event(text="中文 \u2028 \ufeff"), **CAPS).text == "中文 \u2028 \ufeff"


def test_escape_keeps_clean_text_and_escapes_the_rest() -> None:
    assert escape_unstorable("café", 10) == "café"
    assert escape_unstorable("a\x00b\ud800", 100) == "a\\u0000b\\ud800"
    assert escape_unstorable("x" * 10, 4) == "xxxx"


def test_rejections_store_any_bytes_alike_on_both_databases(make_runtime) -> None:
    rt = make_runtime()
    hostile = [
        {"op": "upsert", "doc_id": "s\ud800", "text": "t", "event_id": "e\x00", "metadata": {"\udc00": 1}},
        {"op": "upsert", "doc_id": "ok", "collection": "c\x00", "text": "x" * 10_000, "version": "7"},
        {"op": "upsert", "doc_id": "d" * 2000, "text": "t"},
        {"\x00": "\ud800"},
        [{"deep": [[[["\ud800"]]]]}],
    ]
    outcome = tasks.ingest_events(rt, [*hostile, {"op": "upsert", "doc_id": "good", "text": "fine"}])
    assert outcome == {"rejected": 5, "accepted": 1}
    with rt.sessions() as session:
        rows = session.execute(sa.select(RejectedEvent).order_by(RejectedEvent.id)).scalars().all()
    assert [(r.field, r.doc_id) for r in rows] == [
        ("doc_id", "s\\ud800"),
        ("collection", "ok"),
        ("doc_id", "d" * 512),
        ("\\u0000", None),
        ("event", None),
    ]
    assert rows[0].event_id == "e\\u0000" and rows[1].collection == "c\\u0000"
    assert json.loads(rows[0].event_json)["doc_id"] == "s\ud800"  # escapes that JSON reads back
    assert all(len(r.event_json) <= documents.REJECTED_EVENT_MAX_CHARS for r in rows)


def test_event_ids_are_scoped_by_tenant_and_collection(make_runtime) -> None:
    rt = make_runtime()
    same_id = [
        event(doc_id="a", event_id="e1", tenant="t1"),
        event(doc_id="a", event_id="e1", tenant="t2"),
        event(doc_id="a", event_id="e1", tenant="t1", collection="other"),
        event(doc_id="b", event_id="e1", tenant="t1"),  # the same tenant and collection: a duplicate
    ]
    assert tasks.ingest_events(rt, same_id) == {"accepted": 3, "duplicate": 1}
    with rt.sessions() as session:
        keys = session.execute(sa.select(SeenEvent.tenant, SeenEvent.collection, SeenEvent.event_id)).all()
    assert sorted(keys) == [("t1", "documents", "e1"), ("t1", "other", "e1"), ("t2", "documents", "e1")]


def test_versions_never_pass_the_largest_exact_version(make_runtime) -> None:
    rt = make_runtime()
    outcome = tasks.ingest_events(
        rt,
        [
            event(version=MAX_VERSION),
            event(),  # arrival order: MAX_VERSION + 1, the largest version there is
            event(),  # nothing after it: rejected, field version
        ],
    )
    assert outcome == {"accepted": 2, "rejected": 1}
    with rt.sessions() as session:
        version = session.execute(sa.text("select version from documents")).scalar_one()
        field, reason = session.execute(sa.select(RejectedEvent.field, RejectedEvent.reason)).one()
    assert version == MAX_VERSION + 1
    assert field == "version" and "largest" in reason


def test_a_failure_on_one_event_rejects_it_and_the_rest_flow(make_runtime, monkeypatch) -> None:
    rt = make_runtime()
    desired = accepting._desired_state

    def buggy(ev: Any, now: Any) -> Any:  # on every path: together, and one by one
        if ev.doc_id == "bug":
            raise ValueError("secret document text")
        return desired(ev, now)

    monkeypatch.setattr(accepting, "_desired_state", buggy)
    outcome = tasks.ingest_events(rt, [event(doc_id="a"), event(doc_id="bug"), event(doc_id="b")])
    assert outcome == {"accepted": 2, "rejected": 1}
    with rt.sessions() as session:
        assert session.execute(sa.select(RejectedEvent.field, RejectedEvent.reason)).one() == (
            "event",
            "ValueError",
        )

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise sql_errors.OperationalError("INSERT …", {}, ConnectionRefusedError())

    monkeypatch.setattr(accepting, "_desired_state", unreachable)
    with pytest.raises(sql_errors.OperationalError):  # transient: the whole message is retried
        tasks.ingest_events(rt, [event(doc_id="c")])


class Retried(Exception):
    def __init__(self, countdown: float) -> None:
        self.countdown = countdown


def fake_task(
    *, retries: int = 0, task_id: str = "t-1", args: tuple[Any, ...] = (), redelivered: bool = False
) -> Any:
    """The parts of a bound Celery task that `tasks._run` reads: request, app config, retry."""

    def retry(countdown: float) -> Retried:
        return Retried(countdown)

    return SimpleNamespace(
        name="sidecar.ingest",
        request=SimpleNamespace(
            id=task_id, retries=retries, args=args, kwargs={}, delivery_info={"redelivered": redelivered}
        ),
        app=SimpleNamespace(conf=SimpleNamespace(visibility_timeout=300.0)),
        retry=retry,
    )


@pytest.fixture()
def worker_rt(make_runtime, monkeypatch):
    rt = make_runtime(max_attempts=3, ingest_retries=5)
    monkeypatch.setattr(tasks, "_runtime", rt)
    monkeypatch.setattr(tasks, "_settings", rt.settings)
    return rt


def test_long_task_ids_are_kept_by_their_hash(worker_rt) -> None:
    task = fake_task(task_id="t" * 200)
    with worker_rt.sessions.begin() as session:
        assert attempts.message_started(session, "t" * 200 + ":0") == 1
        assert attempts.message_started(session, "t" * 200 + ":0") == 2
        (key,) = session.execute(sa.select(MessageAttempt.task_id)).scalars()
    assert len(key) == 64
    result = tasks._run(task, tasks._ingest_work(task, [event(doc_id="long")]))
    assert result == {"accepted": 1}


def test_failures_are_retried_with_backoff_then_dead_lettered(worker_rt, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(attempts, "message_finished", broken)
    work = [event(doc_id="x")]
    for retries in range(3):  # max_attempts
        task = fake_task(retries=retries)
        with pytest.raises(Retried) as info:
            tasks._run(task, tasks._ingest_work(task, work))
        assert 0 < info.value.countdown <= 300 / 4
    task = fake_task(retries=3, args=(work[0],))
    assert tasks._run(task, tasks._ingest_work(task, work)) == {"rejected": 1}
    with worker_rt.sessions() as session:
        row = session.execute(sa.select(RejectedEvent)).scalar_one()
    assert (row.field, row.reason) == ("message", "ValueError after 4 tries: dead-lettered")

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise sql_errors.OperationalError("SELECT …", {}, ConnectionRefusedError())

    monkeypatch.setattr(attempts, "message_started", unreachable)  # a redelivery's attempt row
    with pytest.raises(Retried):  # transient: up to ingest_retries, not max_attempts
        tasks._run(fake_task(retries=4, redelivered=True), tasks._ingest_work(fake_task(), work))


class Killed(BaseException):
    """The worker dying inside a task: nothing of ours runs after it."""


def test_a_message_that_keeps_stopping_the_worker_is_dead_lettered(worker_rt) -> None:
    """Its first delivery writes no attempt row; the broker marks the redeliveries (the visibility
    timeout's restore), which count from 2, so the limit is max_attempts deliveries, as before."""

    def killing(rt: Any, key: str | None) -> dict[str, int]:
        raise Killed()

    for delivery in range(3):  # max_attempts deliveries, each killing the worker
        task = fake_task(args=({"doc_id": "x"},), redelivered=delivery > 0)
        with pytest.raises(Killed):
            tasks._run(task, killing)
    with worker_rt.sessions() as session:
        assert session.execute(sa.select(MessageAttempt.attempts)).scalar_one() == 3
    task = fake_task(args=({"doc_id": "x"},), redelivered=True)
    assert tasks._run(task, killing) == {"rejected": 1}
    with worker_rt.sessions() as session:
        row = session.execute(sa.select(RejectedEvent)).scalar_one()
        assert session.execute(sa.select(sa.func.count()).select_from(MessageAttempt)).scalar_one() == 0
    assert row.reason.startswith("the message was delivered 4 times and never finished")


def test_a_first_delivery_writes_no_attempt_row(worker_rt, monkeypatch) -> None:
    def unexpected(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an attempt row for a first delivery")

    monkeypatch.setattr(attempts, "message_started", unexpected)
    task = fake_task(task_id="first")
    assert tasks._run(task, tasks._ingest_work(task, [event(doc_id="first")])) == {"accepted": 1}


def test_backoff_grows_is_capped_and_jittered() -> None:
    assert all(0.5 <= tasks.backoff_s(0, cap_s=75) <= 1 for _ in range(20))
    assert all(37.5 <= tasks.backoff_s(30, cap_s=75) <= 75 for _ in range(20))
    assert len({tasks.backoff_s(5, cap_s=75) for _ in range(20)}) > 1


def test_an_undeliverable_entry_is_one_rejection(worker_rt) -> None:
    description = {
        "queue": "celery",
        "raw": '{"x": "\\ud800"} \ud800\x00' + "y" * 9000,
        "reason": "not a kombu envelope",
    }
    task = fake_task()
    assert tasks._run(task, lambda rt, key: tasks.record_undeliverable(rt, description, key)) == {
        "rejected": 1
    }
    assert tasks.record_undeliverable(worker_rt, "junk") == {"rejected": 1}
    with worker_rt.sessions() as session:
        rows = session.execute(sa.select(RejectedEvent).order_by(RejectedEvent.id)).scalars().all()
        left = session.execute(sa.select(sa.func.count()).select_from(MessageAttempt)).scalar_one()
    assert [(r.field, r.reason) for r in rows] == [
        ("message", "not a kombu envelope"),
        ("message", "undeliverable (no reason given)"),
    ]
    assert rows[0].event_json.startswith('{"x": "\\ud800"} \\ud800\\u0000yyy')
    assert len(rows[0].event_json) == documents.REJECTED_EVENT_MAX_CHARS
    assert left == 0


# --- messages recorded together (worker/groupcommit.py) ------------------------------------------


def test_messages_that_arrive_together_share_one_commit() -> None:
    """The first submitter commits alone; what queues meanwhile goes as one group, each caller
    getting its own result; a group of one hands its exception to its caller."""
    import threading

    from worker.groupcommit import GroupCommit

    group: GroupCommit[str, str] = GroupCommit()
    gate, inside, groups = threading.Event(), threading.Event(), []

    def commit(items: Any) -> list[str]:
        groups.append(list(items))
        inside.set()
        gate.wait(10)
        return [item.upper() for item in items]

    results: dict[str, str] = {}

    def submit(item: str) -> None:
        results[item] = group.submit(item, commit)

    first = threading.Thread(target=submit, args=("a",))
    first.start()
    assert inside.wait(10)
    others = [threading.Thread(target=submit, args=(item,)) for item in ("b", "c")]
    for thread in others:
        thread.start()
    while len(group._queue) < 2:
        threading.Event().wait(0.01)
    gate.set()
    for thread in (first, *others):
        thread.join(10)
    assert groups[0] == ["a"] and sorted(groups[1]) == ["b", "c"] and len(groups) == 2
    assert results == {"a": "A", "b": "B", "c": "C"}

    def broken(items: Any) -> list[str]:
        raise ValueError("spoiled")

    with pytest.raises(ValueError, match="spoiled"):
        group.submit("d", broken)
    assert group.submit("e", commit) == "E"  # the group is free again


def test_messages_streaming_in_wait_for_company_and_a_lone_one_does_not(monkeypatch) -> None:
    """A leader whose message came right after another waits (up to `gather_s`) until `gather`
    messages are queued; a message after a quiet spell commits at once, however long gather_s."""
    import threading

    from worker.groupcommit import GroupCommit

    group: GroupCommit[str, str] = GroupCommit(gather=3, gather_s=60.0)
    monkeypatch.setattr(group, "STREAM_GAP_S", 5.0)  # "right after": slow thread starts included
    groups: list[list[str]] = []

    def commit(items: Any) -> list[str]:
        groups.append(list(items))
        return list(items)

    assert group.submit("lone", commit) == "lone"  # nothing before it: no wait (60 s otherwise)
    threads = [threading.Thread(target=group.submit, args=(item, commit)) for item in ("x", "y", "z")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert groups[0] == ["lone"] and sorted(groups[1]) == ["x", "y", "z"] and len(groups) == 2
    group._last_arrival = float("-inf")  # a quiet spell
    assert group.submit("later", commit) == "later" and groups[-1] == ["later"]


def test_a_group_with_a_spoiling_event_is_recorded_message_by_message(make_runtime, monkeypatch) -> None:
    from worker import intake

    rt = make_runtime()
    desired = accepting._desired_state

    def buggy(ev: Any, now: Any) -> Any:
        if ev.doc_id == "bug":
            raise ValueError("secret document text")
        return desired(ev, now)

    def message(n: int, *doc_ids: str) -> Any:
        raw = [event(doc_id=d) for d in doc_ids]
        return intake._Message(raw, [intake._parse(rt, r) for r in raw], f"m-{n}", f"m-{n}:0")

    good = [message(1, "z", "a"), message(2, "a", "y")]
    assert intake._ingest_group(rt, good) == [{"accepted": 2}, {"accepted": 2}]
    monkeypatch.setattr(accepting, "_desired_state", buggy)
    spoiled = [message(3, "b"), message(4, "c", "bug", ""), message(5, "d")]
    assert intake._ingest_group(rt, spoiled) == [None, None, None]  # nothing of it committed
    assert [intake._ingest_message(rt, m) for m in spoiled] == [
        {"accepted": 1},
        {"accepted": 1, "rejected": 2},
        {"accepted": 1},
    ]
    with rt.sessions() as session:
        docs = dict(session.execute(sa.select(documents.Document.doc_id, documents.Document.version)).all())
        counted = session.execute(
            sa.select(sa.func.sum(HourlyCounter.value)).where(HourlyCounter.name == "events_accepted")
        ).scalar_one()
    assert docs == {"a": 1, "b": 0, "c": 0, "d": 0, "y": 0, "z": 0}  # "a" twice: arrival order numbers it
    assert counted == 7
