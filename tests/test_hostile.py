"""Hostile input through a real worker process: every input ends as a document or a rejection.

Issue 9's promise, checked against `python -m api.cli worker` on Redis with SQLite and with
PostgreSQL (one long-lived worker per database): arbitrary JSON values, any code point (lone
surrogates and NUL included), extreme integers, deep nesting and near-valid events with one
hostile field go through `sidecar.ingest` and `sidecar.ingest_many` beside good events; foreign
entries (not Celery messages, undecodable bodies) are pushed raw onto the queue list. Afterwards
every good event is indexed, every other input is a document state or a `rejected_events` row
with a field and a rule, no message is left on any queue list (undeliverable entries may only
be parked in `<queue>.undeliverable`), and the worker is alive and never restarted its consumer.

Lone surrogates need no special publishing: Celery's JSON serializer keeps `ensure_ascii`, so a
str holding one travels as a `\\ud800` escape, exactly what a producer in another language sends.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fixtures.worker_process import SidecarWorker
from worker import events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUEUE = "celery"  # the worker consumes Celery's default queue
FIELDS = ("op", "doc_id", "collection", "version", "text", "metadata", "tenant", "event_id")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_VERSION = events.MAX_VERSION
MAX_METADATA_BYTES = 16 << 10
SETTLE_S = 30.0
GOOD_TEXT = "good note about tea and lanterns"  # must never reach the worker's log
RESTART_MARKERS = ("Connection to broker lost", "Frequent restarts detected", "Unrecoverable error")
MISSING = object()  # a near-valid event without the field

# --- generated input -------------------------------------------------------------------------

SPECIAL_CODE_POINTS = (
    0,
    0xD800,
    0xDBFF,
    0xDC00,
    0xDFFF,
    0xFFFE,
    0xFFFF,
    0xFEFF,
    0x10FFFF,
    0x202E,
    0x2028,
    0x85,
)
EXTREME_INTS = (-(2**64), -(2**63) - 1, -(2**63), -1, 0, MAX_VERSION, 2**63, 2**64, 10**30)

code_points = st.one_of(
    st.integers(0, 0x10FFFF), st.integers(0xD800, 0xDFFF), st.sampled_from(SPECIAL_CODE_POINTS)
)


def texts(max_size: int = 16) -> st.SearchStrategy[str]:
    """Any code points, lone surrogates and NUL included (`st.characters` leaves surrogates out)."""
    return st.lists(code_points, max_size=max_size).map(lambda cps: "".join(map(chr, cps)))


def nested(depth: int, kind: str) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


numbers = st.one_of(st.integers(), st.sampled_from(EXTREME_INTS), st.floats(), st.booleans())
scalars = st.one_of(
    st.none(), numbers, texts(), st.sampled_from(("upsert", "delete", "documents\n", "", "a" * 65))
)
keys = st.one_of(texts(8), st.sampled_from(FIELDS))
deep = st.builds(nested, st.integers(100, 200), st.sampled_from(("list", "dict")))
json_values = st.one_of(
    st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
        max_leaves=12,
    ),
    deep,
)
names = st.one_of(texts(), st.sampled_from(("documents\n", "a" * 65, "has space", "ok_name")))
HOSTILE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "op": st.one_of(st.sampled_from(("UPSERT", "delete", "upsert\n")), json_values),
    "doc_id": st.one_of(texts(), st.just("x" * 600), json_values),
    "collection": st.one_of(names, json_values),
    "tenant": st.one_of(names, json_values),
    "version": st.one_of(st.sampled_from(EXTREME_INTS), numbers, st.just("7"), json_values),
    "text": st.one_of(texts(64), json_values),
    "metadata": st.one_of(st.dictionaries(keys, json_values, max_size=3), deep, json_values),
    "event_id": st.one_of(texts(), st.just("e" * 300), json_values),
    "extra": json_values,
}


@dataclass(frozen=True)
class Hostile:
    event: Any
    field: str | None  # the one hostile field of a near-valid event; None for any JSON value


def near_valid(field: str, value: Any) -> Hostile:
    event: dict[str, Any] = {"op": "upsert", "doc_id": "", "version": 1, "text": "a valid text"}
    if value is MISSING:
        event.pop(field, None)
    else:
        event[field] = value
    return Hostile(event, field)


near_valid_events = st.sampled_from(sorted(HOSTILE_VALUES)).flatmap(
    lambda field: st.builds(near_valid, st.just(field), st.one_of(st.just(MISSING), HOSTILE_VALUES[field]))
)
hostile_events = st.one_of(json_values.map(lambda value: Hostile(value, None)), near_valid_events)


def personalize(hostile: Hostile, prefix: str) -> Any:
    """Give a string `doc_id` / `event_id` a unique prefix, so each event's outcome is its own."""
    event = hostile.event
    if not isinstance(event, dict):
        return event
    event = dict(event)
    for key in ("doc_id", "event_id"):
        if isinstance(event.get(key), str):
            event[key] = prefix + event[key]
    return event


# --- what the contract says about a near-valid event (only where it is unambiguous) ------------


def has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    return False


def has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    return False


def broken_field(event: dict[str, Any], field: str) -> str | None:
    """The field a near-valid event must be rejected for, or None when it may be valid (or the
    contract leaves the outcome open, e.g. NUL in text or `op: delete` with a text)."""
    value = event.get(field, MISSING)
    if field == "extra":
        return None if value is MISSING else field  # an unknown field
    if field == "op":
        return None if value in ("upsert", "delete") else field
    if field == "doc_id":
        invalid = not isinstance(value, str) or not 1 <= len(value) <= 512 or has_surrogate(value)
        return field if invalid else None
    if value is MISSING or value is None:
        return field if field == "text" else None
    if field in ("collection", "tenant"):
        return None if isinstance(value, str) and NAME.fullmatch(value) else field
    if field == "version":
        valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION
        return None if valid else field
    if field in ("text", "event_id"):
        return None if isinstance(value, str) and not has_surrogate(value) else field
    if field == "metadata":
        if not isinstance(value, dict) or has_surrogate(value) or has_non_finite(value):
            return field
        return field if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_METADATA_BYTES else None
    raise AssertionError(f"no rule for {field}")


# --- observing the worker's results ----------------------------------------------------------


@dataclass
class Outcome:
    docs: dict[str, tuple[int | None, str]]  # doc_id -> (version, status)
    rejected: list[Any]  # rows (id, field, reason, doc_id) added since the marker
    leftovers: dict[str, int]  # Redis lists/hashes still holding messages


@dataclass
class Harness:
    worker: SidecarWorker
    engine: sa.Engine
    redis: redis.Redis

    def rejected_marker(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("select coalesce(max(id), 0) from rejected_events")).scalar_one())

    def observe(self, prefixes: tuple[str, ...], marker: int) -> Outcome:
        like = " or ".join(f"doc_id like :p{i}" for i in range(len(prefixes)))
        params = {f"p{i}": f"{p}%" for i, p in enumerate(prefixes)}
        with self.engine.connect() as conn:
            docs = conn.execute(
                sa.text(f"select doc_id, version, status from documents where {like}"), params
            )
            rejected = conn.execute(
                sa.text("select id, field, reason, doc_id from rejected_events where id > :m order by id"),
                {"m": marker},
            ).all()
            return Outcome({d: (v, s) for d, v, s in docs}, list(rejected), queue_leftovers(self.redis))

    def settle(self, prefixes: tuple[str, ...], marker: int, done: Callable[[Outcome], bool]) -> Outcome:
        """Poll until `done` holds (or the deadline passes, or the worker dies); the last outcome."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            outcome = self.observe(prefixes, marker)
            if done(outcome) or time.monotonic() > deadline or not self.worker.alive():
                return outcome
            time.sleep(0.2)

    def push_raw(self, *entries: bytes) -> None:
        """Put entries on the queue list the way kombu publishes (LPUSH; consumers pop the right)."""
        for entry in entries:
            self.redis.lpush(QUEUE, entry)

    def recover(self) -> None:
        """A fresh worker on empty queues, so that what one test left stuck fails only that test."""
        self.worker.stop()
        for name in queue_leftovers(self.redis):
            self.redis.delete(name)
        self.worker.start()


def queue_leftovers(client: redis.Redis) -> dict[str, int]:
    """Every Redis list (queue, priority sub-queues, in-flight lists) still holding entries, and
    kombu's `unacked` hash; `<queue>.undeliverable` is where rejected entries may stay."""
    out: dict[str, int] = {}
    for raw in client.scan_iter(count=1000):
        name = raw.decode("utf-8", errors="backslashreplace")
        kind = client.type(raw)
        if kind == b"list" and not name.endswith(".undeliverable"):
            out[name] = int(client.llen(raw))
        elif kind == b"hash" and name == "unacked":
            out[name] = int(client.hlen(raw))
    return {name: n for name, n in out.items() if n}


def common_problems(
    harness: Harness, outcome: Outcome, good: list[dict[str, Any]], log_from: int
) -> list[str]:
    """What must hold after any input: the worker alive and never restarting its consumer, no
    entry left on the broker, every good event indexed, every rejection naming a field and rule."""
    problems = []
    if not harness.worker.alive():
        problems.append(f"the worker died:\n{harness.worker.log()[-3000:]}")
    if outcome.leftovers:
        problems.append(f"entries left on the broker (retried forever or stranded): {outcome.leftovers}")
    wrong = {
        e["doc_id"]: outcome.docs.get(e["doc_id"])
        for e in good
        if outcome.docs.get(e["doc_id"]) != (e["version"], "indexed")
    }
    if wrong:
        problems.append(f"good events not indexed at their version (doc_id: (version, status)): {wrong}")
    nameless = [r for r in outcome.rejected if not r.field or not r.reason or "Traceback" in r.reason]
    if nameless:
        problems.append(f"rejections without a field and a rule: {nameless[:5]}")
    log = harness.worker.log()[log_from:]
    if restarts := [line for line in log.splitlines() if any(m in line for m in RESTART_MARKERS)]:
        problems.append(f"the worker restarted its consumer {len(restarts)} times: {restarts[:3]}")
    if GOOD_TEXT in log:
        problems.append("document text reached the worker's log")
    return problems


# --- the worker, once per database -------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('hostile-db') / 'sidecar.sqlite'}"
        return
    server = request.getfixturevalue("postgres_server_url")
    name = f"sidecar_hostile_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def harness(
    database: str, redis_url: str, emulator_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    emulator_server.reset()
    worker = SidecarWorker(
        Path(tmp_path_factory.mktemp("hostile")),
        database_url=database,
        broker_url=redis_url,
        emulator=emulator_server,
    )
    engine = sa.create_engine(database)
    try:
        worker.start()
        yield Harness(worker, engine, client)
    finally:
        worker.stop()
        engine.dispose()
        client.flushdb()
        client.close()


@pytest.fixture()
def hostile(harness: Harness) -> Iterator[Harness]:
    """The module's worker, replaced after a test that left it dead or left entries queued."""
    yield harness
    if not harness.worker.alive() or queue_leftovers(harness.redis):
        harness.recover()


def good_event(prefix: str, i: int) -> dict[str, Any]:
    return {
        "op": "upsert",
        "doc_id": f"{prefix}{i}",
        "version": i + 1,
        "text": f"{GOOD_TEXT} number {i}.",
        "metadata": {"i": i},
    }


def all_indexed(outcome: Outcome, good: list[dict[str, Any]]) -> bool:
    return all(outcome.docs.get(e["doc_id"]) == (e["version"], "indexed") for e in good)


# --- 1. the whole event space, through sidecar.ingest and sidecar.ingest_many ----------------


def publish_mixed(producer: Any, items: list[Any], rng: random.Random) -> None:
    """Shuffled into messages: `ingest` of one event, or `ingest_many` of 1-6."""
    items = list(items)
    rng.shuffle(items)
    i = 0
    while i < len(items):
        n = rng.randint(1, 6)
        if n == 1 and rng.random() < 0.5:
            producer.send_task("sidecar.ingest", args=[items[i]])
        else:
            producer.send_task("sidecar.ingest_many", args=[items[i : i + n]])
        i += n


def became_documents(events: list[Any], outcome: Outcome) -> list[int]:
    return [
        i
        for i, e in enumerate(events)
        if isinstance(e, dict) and isinstance(e.get("doc_id"), str) and e["doc_id"] in outcome.docs
    ]


def short(value: Any, chars: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= chars else f"{text[:chars]}... ({len(text)} chars)"


def contract_problems(batch: list[Hostile], events: list[Any], outcome: Outcome) -> list[str]:
    """Near-valid events the contract certainly refuses: no document, and a rejection for their
    (unique) doc_id naming the hostile field."""
    fields_by_doc: dict[str, list[str]] = {}
    for row in outcome.rejected:
        fields_by_doc.setdefault(row.doc_id or "", []).append(row.field)
    problems = []
    for h, event in zip(batch, events, strict=True):
        if h.field is None or not isinstance(event, dict):
            continue
        field = broken_field(event, h.field)
        doc_id = event.get("doc_id")
        if field is None or not isinstance(doc_id, str):
            continue
        if doc_id in outcome.docs:
            problems.append(f"accepted an event with a broken {field!r}: {short(event)}")
        elif h.field != "doc_id" and field not in fields_by_doc.get(doc_id, []):
            problems.append(
                f"no rejection with field {field!r} for {short(event)}: {fields_by_doc.get(doc_id)}"
            )
    return problems


@settings(
    max_examples=3,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # each example waits on a worker: no shrinking
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)
@given(
    batch=st.lists(hostile_events, min_size=20, max_size=40),
    bad_calls=st.lists(json_values.filter(lambda v: not isinstance(v, list)), max_size=2),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_event_ends_as_a_document_or_a_rejection(
    hostile: Harness, batch: list[Hostile], bad_calls: list[Any], seed: int
) -> None:
    uid = uuid.uuid4().hex[:10]
    good_prefix, hostile_prefix = f"g{uid}-", f"h{uid}-"
    good = [good_event(good_prefix, i) for i in range(10)]
    events = [personalize(h, f"{hostile_prefix}{i}-") for i, h in enumerate(batch)]
    producer = hostile.worker.producer()
    marker, log_from = hostile.rejected_marker(), len(hostile.worker.log())

    publish_mixed(producer, good + events, random.Random(seed))
    for arg in bad_calls:  # not a list of events: one rejection per message, field `arguments`
        producer.send_task("sidecar.ingest_many", args=[arg])
    producer.send_task("sidecar.ingest", args=[good[0], good[1]])
    calls_rejected = len(bad_calls) + 1

    def unfinished(outcome: Outcome) -> dict[str, str]:
        hostile_docs = {d: s for d, (_, s) in outcome.docs.items() if d.startswith(hostile_prefix)}
        return {d: s for d, s in hostile_docs.items() if s not in ("indexed", "deleted", "dead")}

    def unaccounted(outcome: Outcome) -> int:
        return len(events) - len(became_documents(events, outcome)) + calls_rejected - len(outcome.rejected)

    def done(outcome: Outcome) -> bool:
        return (
            all_indexed(outcome, good)
            and unaccounted(outcome) <= 0
            and not unfinished(outcome)
            and not outcome.leftovers
        )

    outcome = hostile.settle((good_prefix, hostile_prefix), marker, done)

    problems = common_problems(hostile, outcome, good, log_from)
    problems += contract_problems(batch, events, outcome)
    if missing := unaccounted(outcome):
        problems.append(
            f"{len(events)} hostile events and {calls_rejected} bad calls: "
            f"{len(became_documents(events, outcome))} documents and {len(outcome.rejected)} rejections "
            f"({missing} unaccounted; negative: extra rejections); rejected fields: "
            f"{sorted(str(r.field) for r in outcome.rejected)}"
        )
    if stuck := unfinished(outcome):
        problems.append(f"hostile documents never finished: {stuck}")
    assert not problems, "\n".join(problems)


# --- 2. raw entries on the queue list --------------------------------------------------------


def envelope(body: bytes, *, task: str = "sidecar.ingest", task_id: str | None = None) -> bytes:
    """A Celery protocol-2 message as kombu's Redis transport stores it, around `body`."""
    tid = task_id or str(uuid.uuid4())
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": tid,
            "root_id": tid,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
            "argsrepr": "",
            "kwargsrepr": "",
            "origin": "hostile-test",
        },
        "properties": {
            "correlation_id": tid,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


def valid_body(doc_id: str) -> bytes:
    event = {"op": "upsert", "doc_id": doc_id, "text": "raw body"}
    return json.dumps(
        [[event], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    ).encode()


FOREIGN_ENTRIES: dict[str, bytes] = {
    "foreign JSON": b'{"hello": "world"}',
    "undecodable bytes": b"\xff\xfe\x00garbage",
    "body not JSON": envelope(b"{not json"),
    "body nested 100000 deep": envelope(b"[" * 100_000 + b"]" * 100_000),
    "body with a 5000-digit integer": envelope(
        b'[[{"op": "upsert", "doc_id": "huge", "version": ' + b"9" * 5000 + b', "text": "t"}], {}, {}]'
    ),
    "unregistered task": envelope(valid_body("unregistered"), task="sidecar.no_such_task"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_ENTRIES))
def test_a_foreign_entry_becomes_a_rejection_and_the_queue_flows_on(hostile: Harness, kind: str) -> None:
    uid = uuid.uuid4().hex[:10]
    good = [good_event(f"g{uid}-", i) for i in range(3)]
    marker, log_from = hostile.rejected_marker(), len(hostile.worker.log())
    hostile.push_raw(FOREIGN_ENTRIES[kind])
    hostile.worker.producer().send_task("sidecar.ingest_many", args=[good])

    def done(outcome: Outcome) -> bool:
        return all_indexed(outcome, good) and len(outcome.rejected) >= 1 and not outcome.leftovers

    outcome = hostile.settle((f"g{uid}-",), marker, done)

    problems = common_problems(hostile, outcome, good, log_from)
    if [r.field for r in outcome.rejected] != ["message"]:
        problems.append(
            f"want one rejection with field 'message' (sidecar.undeliverable): {outcome.rejected}"
        )
    assert not problems, f"{kind}:\n" + "\n".join(problems)


def test_all_at_once_with_priorities_and_long_task_ids(hostile: Harness) -> None:
    """Every foreign kind, a proper message sent with priority 9 and one with a 200-character
    task id, then good events by both tasks: the good ones are indexed, each foreign entry is one
    rejection, the odd-but-proper ones are processed (the long id may be rejected instead), and no
    list keeps an entry."""
    uid = uuid.uuid4().hex[:10]
    prefix = f"g{uid}-"
    good = [good_event(prefix, i) for i in range(20)]
    prioritized, long_id = good_event(prefix, 100), good_event(prefix, 101)
    marker, log_from = hostile.rejected_marker(), len(hostile.worker.log())
    producer = hostile.worker.producer()

    hostile.push_raw(*FOREIGN_ENTRIES.values())
    producer.send_task("sidecar.ingest", args=[prioritized], priority=9)
    producer.send_task("sidecar.ingest", args=[long_id], task_id="t" * 200)
    producer.send_task("sidecar.ingest_many", args=[good[:10]])
    for event in good[10:]:
        producer.send_task("sidecar.ingest", args=[event])

    def long_id_rejections(outcome: Outcome) -> int:
        return 0 if all_indexed(outcome, [long_id]) else 1

    def done(outcome: Outcome) -> bool:
        expected = len(FOREIGN_ENTRIES) + long_id_rejections(outcome)
        return all_indexed(outcome, [*good, prioritized]) and len(outcome.rejected) >= expected

    outcome = hostile.settle((prefix,), marker, done)

    problems = common_problems(hostile, outcome, [*good, prioritized], log_from)
    fields = sorted(str(r.field) for r in outcome.rejected)
    if fields.count("message") < len(FOREIGN_ENTRIES):
        problems.append(
            f"want a 'message' rejection for each of {len(FOREIGN_ENTRIES)} foreign entries: {fields}"
        )
    if len(fields) != len(FOREIGN_ENTRIES) + long_id_rejections(outcome):
        problems.append(
            f"one rejection per foreign entry, and the 200-character task id indexed "
            f"({outcome.docs.get(long_id['doc_id'])}) or rejected once: {outcome.rejected}"
        )
    assert not problems, "\n".join(problems)
