"""`kind = "debezium"` sources on a real Redis Stream, with the event shapes of Debezium's
documentation (PostgreSQL and MySQL connectors; the Redis sink's compact and extended formats)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa

from worker.capture import runner, state
from worker.capture.debezium import decode_entry, event_version
from worker.capture.sources import RowRejected, load_sources
from worker.sql.models import Document, RejectedEvent

STREAM = "app.public.customers"
KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "int32", "optional": False, "field": "id"}],
    "optional": False,
}


@pytest.fixture()
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def pg_source(lsn: int, **extra) -> dict:
    """`source` of the PostgreSQL connector, as in Debezium's documentation."""
    return {
        "version": "3.0.0.Final", "connector": "postgresql", "name": "app", "ts_ms": 1559033904863,
        "snapshot": "false", "db": "postgres", "sequence": f'["{lsn - 8}","{lsn}"]', "schema": "public",
        "table": "customers", "txId": 555, "lsn": lsn, "xmin": None, **extra,
    }  # fmt: skip


def envelope(op: str, *, before=None, after=None, source=None, wrap=True) -> str:
    payload = {"before": before, "after": after, "source": source, "op": op, "ts_ms": 1559033904863}
    if op == "t":
        payload = {"source": source, "op": "t", "ts_ms": 1559033904863}
    return json.dumps(
        {"schema": {"type": "struct", "name": "app.public.customers.Envelope"}, "payload": payload}
        if wrap
        else payload
    )


def key(id_: int, wrap=True) -> str:
    return json.dumps({"schema": KEY_SCHEMA, "payload": {"id": id_}} if wrap else {"id": id_})


def customer(id_: int, bio: str, email: str = "a@example.com") -> dict:
    return {"id": id_, "first_name": "Anne", "last_name": "Kretchmar", "email": email, "bio": bio}


@pytest.fixture()
def sources(tmp_path, redis_client, redis_url):
    path = tmp_path / "sources.toml"
    path.write_text(
        f'[[sources]]\nname = "customers"\nkind = "debezium"\nstream = "{STREAM}"\n'
        f'redis_url = "{redis_url}"\ncollection = "customers"\ndoc_id = "c{{id}}"\n'
        'text = "{first_name} {last_name}: {bio}"\nmetadata = ["email"]\n'
    )
    return load_sources(path)


def capture_once(rt, sources) -> None:
    assert runner.run_sources(rt, sources, stop=threading.Event(), once=True) == []


def docs(rt) -> dict[str, Document]:
    with rt.sessions() as s:
        return {d.doc_id: d for d in s.execute(sa.select(Document)).scalars()}


def test_compact_format_with_schema_every_op_then_acked_and_trimmed(make_runtime, sources, redis_client):
    r = redis_client
    r.xadd(STREAM, {key(1): envelope("r", after=customer(1, "snapshot bio"), source=pg_source(100))})
    r.xadd(STREAM, {key(2): envelope("c", after=customer(2, "created"), source=pg_source(200))})
    r.xadd(STREAM, {key(1): envelope("u", before=None, after=customer(1, "updated"), source=pg_source(300))})
    r.xadd(STREAM, {key(2): envelope("d", before=customer(2, "created"), source=pg_source(400))})
    r.xadd(STREAM, {key(2): "default"})  # the tombstone after a delete
    rt = make_runtime(capture_snapshot_lane="realtime")
    capture_once(rt, sources)
    found = docs(rt)
    assert found["c1"].text == "Anne Kretchmar: updated" and found["c1"].version == 300
    assert found["c1"].meta == {"email": "a@example.com"}
    assert found["c2"].op == "delete" and found["c2"].version == 400
    info = r.xinfo_groups(STREAM)[0]
    assert info["pending"] == 0
    assert r.xlen(STREAM) == 0  # acknowledged entries trimmed

    r.xadd(STREAM, {key(3): envelope("c", after=customer(3, "three"), source=pg_source(500))})
    r.xadd(STREAM, {key(0): envelope("t", source=pg_source(600))})
    capture_once(rt, sources)
    assert all(d.op == "delete" for d in docs(rt).values())
    with rt.sessions() as s:
        [row] = state.report(s)
    assert row["kind"] == "debezium" and row["rows_total"] == 7 and row["rejected_total"] == 0


def test_extended_format_without_schema_mysql_binlog_versions(make_runtime, sources, redis_client):
    mysql = {
        "connector": "mysql",
        "name": "mysql-server-1",
        "ts_ms": 1465581029100,
        "db": "inventory",
        "table": "customers",
        "server_id": 223344,
    }
    older = {**mysql, "file": "mysql-bin.000003", "pos": 484, "row": 0}
    newer = {**mysql, "file": "mysql-bin.000004", "pos": 154, "row": 0}
    # Out of order: the newer binlog position wins whatever the arrival order.
    redis_client.xadd(
        STREAM,
        {
            "key": key(5, wrap=False),
            "value": envelope("u", after=customer(5, "newer"), source=newer, wrap=False),
            "__debezium.source": "x",
        },
    )
    redis_client.xadd(
        STREAM,
        {
            "key": key(5, wrap=False),
            "value": envelope("u", after=customer(5, "older"), source=older, wrap=False),
        },
    )
    rt = make_runtime(capture_snapshot_lane="realtime")
    capture_once(rt, sources)
    doc = docs(rt)["c5"]
    assert doc.text == "Anne Kretchmar: newer" and doc.version == (4 << 32) + 154


def test_unavailable_value_keeps_the_stored_text(make_runtime, sources, redis_client):
    redis_client.xadd(
        STREAM, {key(1): envelope("c", after=customer(1, "long biography"), source=pg_source(100))}
    )
    unchanged = customer(1, "__debezium_unavailable_value", email="new@example.com")
    redis_client.xadd(STREAM, {key(1): envelope("u", after=unchanged, source=pg_source(200))})
    rt = make_runtime(capture_snapshot_lane="realtime")
    capture_once(rt, sources)
    doc = docs(rt)["c1"]
    assert doc.text == "Anne Kretchmar: long biography" and doc.meta == {"email": "new@example.com"}
    assert doc.version == 200


def test_bad_entries_are_rejected_with_source_key_and_rule(make_runtime, sources, redis_client):
    r = redis_client
    bad = r.xadd(STREAM, {"a": "1", "b": "2"})
    r.xadd(STREAM, {key(1): "{not json"})
    r.xadd(STREAM, {key(1): envelope("x", after=customer(1, "?"), source=pg_source(1))})
    r.xadd(STREAM, {key(1): envelope("c", after={"id": 1, "bio": "no names"}, source=pg_source(2))})
    r.xadd(STREAM, {key(2): envelope("c", after=customer(2, "good"), source=pg_source(3))})
    r.xadd(STREAM, {key(3): envelope("c", after=customer(3, "too new"), source=pg_source(2**60))})
    rt = make_runtime(capture_snapshot_lane="realtime")
    capture_once(rt, sources)
    assert {d for d, doc in docs(rt).items() if doc.op == "upsert"} == {"c2"}
    with rt.sessions() as s:
        rows = s.execute(
            sa.select(RejectedEvent.field, RejectedEvent.reason).order_by(RejectedEvent.id)
        ).all()
    assert sorted(f for f, _ in rows) == ["entry", "first_name", "op", "value", "version"] or len(rows) == 5
    assert all(reason.startswith("source customers key ") for _, reason in rows)
    assert any(f"entry {bad.decode()}" in reason for _, reason in rows)
    assert redis_client.xinfo_groups(STREAM)[0]["pending"] == 0


def test_entries_a_dead_consumer_held_are_claimed(make_runtime, sources, redis_client):
    r = redis_client
    r.xgroup_create(STREAM, "customers", id="0", mkstream=True)
    r.xadd(STREAM, {key(1): envelope("c", after=customer(1, "held"), source=pg_source(100))})
    r.xreadgroup("customers", "dead-host", {STREAM: ">"}, count=10)  # read, never acknowledged
    time.sleep(0.2)
    rt = make_runtime(capture_snapshot_lane="realtime", capture_claim_idle_s=0.1)
    capture_once(rt, sources)
    assert docs(rt)["c1"].text == "Anne Kretchmar: held"
    assert r.xinfo_groups(STREAM)[0]["pending"] == 0


def test_decoding_rules_in_isolation():
    with pytest.raises(RowRejected) as caught:
        event_version({"op": "c", "source": {}})
    assert caught.value.field == "version"
    assert decode_entry({b"k": b"default"}, "1-0", snapshot_lane=None) == []
    [change] = decode_entry(
        {key(1).encode(): envelope("r", after=customer(1, "x"), source=pg_source(7)).encode()},
        "1-0",
        snapshot_lane="batch",
    )
    assert change.lane == "batch" and change.version == 7 and change.op == "upsert"
    [delete] = decode_entry(
        {key(4).encode(): envelope("d", before=None, source=pg_source(9)).encode()}, "2-0", snapshot_lane=None
    )
    assert delete.op == "delete" and delete.row == {"id": 4}


def test_own_unacknowledged_entries_are_read_again_after_a_crash(make_runtime, sources, redis_client):
    """A capture killed after its commit and before XACK: the same host's consumer reads them
    again on start; the second commit is a duplicate (same version), invisible."""
    import socket

    r = redis_client
    r.xgroup_create(STREAM, "customers", id="0", mkstream=True)
    r.xadd(STREAM, {key(1): envelope("c", after=customer(1, "once"), source=pg_source(100))})
    r.xreadgroup("customers", socket.gethostname()[:64], {STREAM: ">"}, count=10)  # then "killed"
    rt = make_runtime(capture_snapshot_lane="realtime", capture_claim_idle_s=3600)
    capture_once(rt, sources)
    assert docs(rt)["c1"].text == "Anne Kretchmar: once"
    assert r.xinfo_groups(STREAM)[0]["pending"] == 0
    capture_once(rt, sources)  # nothing new: nothing changes
    assert docs(rt)["c1"].version == 100
