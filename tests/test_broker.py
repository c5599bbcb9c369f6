"""The reliable Redis pop: a killed consumer's in-flight message goes back on the queue, entries
that are not messages are set aside and reported, and priority sub-queues are consumed."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

from celery import Celery

from worker import broker, entries


def test_dead_consumers_messages_go_back_on_their_queue(redis_client):
    dead, alive = uuid.uuid4().hex, uuid.uuid4().hex
    redis_client.lpush(f"{broker.INFLIGHT_PREFIX}{dead}:celery", b"m1", b"m2")
    redis_client.lpush(f"{broker.INFLIGHT_PREFIX}{alive}:celery", b"m3")
    redis_client.set(f"{broker.ALIVE_PREFIX}{alive}", "1", ex=30)
    redis_client.lpush("celery", b"waiting")
    assert broker.restore_dead_consumers(redis_client) == 2
    # Restored messages go where the next pop takes from (the right end), oldest first.
    assert redis_client.lrange("celery", 0, -1) == [b"waiting", b"m1", b"m2"]
    assert redis_client.llen(f"{broker.INFLIGHT_PREFIX}{alive}:celery") == 1


CONSUMER = r"""
import os, sys, time
from celery import Celery
app = Celery(broker=os.environ["BROKER"])
app.conf.broker_transport = "worker.broker:Transport"
app.conf.task_acks_late = True
app.conf.worker_prefetch_multiplier = 1
hold = os.environ["HOLD_FILE"]

@app.task(name="t.slow")
def slow(n):
    open(hold, "a").write(f"{n}\n")
    time.sleep(60)

app.worker_main(["worker", "--pool=solo", "--without-gossip", "--without-mingle", "--loglevel=WARNING"])
"""


def test_messages_of_a_killed_worker_are_delivered_again(redis_url, tmp_path):
    """A worker SIGKILLed with a message in hand: that message and the queued ones all arrive."""
    db = redis_url.rsplit("/", 1)[0] + "/8"
    import redis

    r = redis.Redis.from_url(db)
    r.flushdb()
    hold = tmp_path / "seen"
    env = {**os.environ, "BROKER": db, "HOLD_FILE": str(hold)}
    producer = Celery(broker=db)
    producer.conf.broker_transport_options = {
        "visibility_timeout": 2,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    for n in range(3):
        producer.send_task("t.slow", args=[n])
    first = subprocess.Popen([sys.executable, "-c", CONSUMER], env=env)
    deadline = time.monotonic() + 30
    while not hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # Nothing may be lost: every message is in the queue, unacked, or in a dead consumer's list.
    queued = (
        r.llen("celery")
        + r.hlen("unacked")
        + sum(r.llen(k) for k in r.scan_iter(match=f"{broker.INFLIGHT_PREFIX}*"))
    )
    assert queued >= 3, queued
    r.flushdb()


RECORDER = r"""
import json, os
from celery import Celery
app = Celery(broker=os.environ["BROKER"])
app.conf.broker_transport = "worker.broker:Transport"
app.conf.task_acks_late = True
app.conf.worker_prefetch_multiplier = 1
out = os.environ["OUT_FILE"]

def record(entry):
    with open(out, "a") as f:
        f.write(json.dumps(entry) + "\n")

@app.task(name="sidecar.undeliverable")
def undeliverable(entry):
    record({"undeliverable": entry})

@app.task(name="t.record")
def note(value):
    record({"task": value})

app.worker_main(["worker", "--pool=solo", "--without-gossip", "--without-mingle", "--loglevel=WARNING"])
"""


def read_records(path, count: int, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} records: {path.read_text() if path.exists() else ''}")


def test_foreign_entries_are_set_aside_and_priority_messages_consumed(redis_url, tmp_path):
    """Entries that are not messages go to `celery.undeliverable` and reach the worker as
    `sidecar.undeliverable` tasks; the messages behind them, one with a priority, are consumed."""
    db = redis_url.rsplit("/", 1)[0] + "/8"
    import redis

    r = redis.Redis.from_url(db)
    r.flushdb()
    info = b'"delivery_info": {"exchange": "", "routing_key": "celery"}'
    foreign = [
        json.dumps({"hello": "world"}).encode(),
        b"\xff\xfe{not utf-8",
        b"plain text, not JSON",
        # kombu's shape to Redis's Lua (recorded as unacked at the pop), not UTF-8 to the worker
        b'{"body": "e30=", "properties": {"delivery_tag": "\xff\xfe", ' + info + b"}}",
    ]
    r.lpush("celery", *foreign)  # popped from the right: these come first
    producer = Celery(broker=db)
    producer.send_task("t.record", args=["plain"])
    producer.send_task("t.record", args=["low"], priority=9)
    assert r.llen("celery\x06\x169") == 1  # kombu's sub-queue for priority 9
    out = tmp_path / "records"
    worker = subprocess.Popen(
        [sys.executable, "-c", RECORDER], env={**os.environ, "BROKER": db, "OUT_FILE": str(out)}
    )
    try:
        records = read_records(out, len(foreign) + 2)
    finally:
        worker.terminate()
        worker.wait(30)
    assert sorted(rec["task"] for rec in records if "task" in rec) == ["low", "plain"]
    reported = [rec["undeliverable"] for rec in records if "undeliverable" in rec]
    expected_raw = [json.dumps(entry.decode("utf-8", "replace"), ensure_ascii=True) for entry in foreign]
    assert [entry["raw"] for entry in reported] == expected_raw
    assert all(entry["queue"] == "celery" and entry["reason"] for entry in reported)
    assert "UTF-8" in reported[1]["reason"] and "JSON" in reported[2]["reason"]
    assert "UTF-8" in reported[3]["reason"]
    assert r.hlen("unacked") == r.zcard("unacked_index") == 0  # its record went with it
    assert r.lrange("celery.undeliverable", 0, -1) == foreign[::-1]
    assert r.llen("celery") == r.llen("celery\x06\x169") == 0
    assert [k for k in r.scan_iter(match=f"{broker.INFLIGHT_PREFIX}*") if r.llen(k)] == []
    r.flushdb()


def test_a_raw_entry_is_reported_escaped_and_capped():
    item = b"\xff" + "\u00e9".encode() * 5000
    message = entries.undeliverable_message("q", item, "not UTF-8")
    assert message["headers"]["task"] == entries.UNDELIVERABLE_TASK
    assert entries.envelope_problem(message) is None  # a message kombu can deliver
    [[argument], kwargs, _embed] = json.loads(__import__("base64").b64decode(message["body"]))
    assert kwargs == {} and argument["queue"] == "q" and argument["reason"] == "not UTF-8"
    assert len(argument["raw"]) == entries.RAW_CHARS and argument["raw"].isascii()
    assert argument["raw"].startswith('"\\ufffd\\u00e9')


def test_a_pop_takes_several_entries_and_records_messages_as_kombu_does(redis_client):
    """One Lua call: up to `want` entries across the priority lists, in order; each kombu message
    recorded as unacked exactly as kombu's QoS.append records it, anything else set on its
    in-flight list for the worker to judge."""
    from kombu.utils.json import loads

    r = redis_client
    keys = ["q", "q\x06\x163"]
    inflights = [f"{broker.INFLIGHT_PREFIX}c:{key}" for key in keys]
    r.delete(*keys, *inflights, "ui", "u")

    def message(tag: str) -> bytes:
        info = {"exchange": "", "routing_key": "q/x"}
        properties = {"delivery_tag": tag, "delivery_info": info}
        return json.dumps({"body": "e30=", "headers": {}, "properties": properties}).encode()

    r.lpush("q", message("a"), b'{"properties": []}', b"\xff not json")  # popped from the right: a first
    r.lpush("q\x06\x163", message("b"))
    pop = r.register_script(broker._POP)
    reply = pop(keys=[*keys, *inflights, "ui", "u"], args=[3, 1700000000.5, "1"])
    assert [(i, item, tag) for i, item, tag in reply] == [
        (1, message("a"), b"a"),
        (1, b'{"properties": []}', None),
        (1, b"\xff not json", None),
    ]
    assert r.lrange(inflights[0], 0, -1) == [b"\xff not json", b'{"properties": []}']
    assert r.zrange("ui", 0, -1, withscores=True) == [(b"a", 1700000000.5)]
    assert loads(r.hget("u", "a")) == [json.loads(message("a")), "", "q/x"]
    reply = pop(keys=[*keys, *inflights, "ui", "u"], args=[3, 1.0, "0"])  # no acks: nothing recorded
    assert reply == [[2, message("b"), None]] and r.lrange(inflights[1], 0, -1) == [message("b")]
    assert pop(keys=[*keys, *inflights, "ui", "u"], args=[3, 1.0, "1"]) == []
    r.delete(*keys, *inflights, "ui", "u")


def test_a_delivery_that_raises_gives_it_and_the_rest_of_its_pop_back(redis_url):
    """Three messages in one pop; the consumer raises on the second: the first two stay unacked
    (kombu recorded them before the callback), the third goes back onto the queue, unrecorded;
    closing the connection restores the unacked ones."""
    import redis
    from kombu import Connection, Consumer, Producer, Queue

    db = redis_url.rsplit("/", 1)[0] + "/8"
    r = redis.Redis.from_url(db)
    r.flushdb()
    queue = Queue("gb", routing_key="gb")
    seen: list[int] = []

    def on_message(body: dict, message) -> None:
        seen.append(body["n"])
        assert r.llen("gb") == 0  # all three taken by one pop
        if body["n"] == 1:
            raise RuntimeError("the consumer fails")

    with Connection(db, transport=broker.Transport) as conn:
        producer = Producer(conn.default_channel)
        for n in range(3):
            producer.publish({"n": n}, routing_key="gb", declare=[queue], serializer="json")
        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=3):
            with contextlib.suppress(RuntimeError):
                conn.drain_events(timeout=5)
        assert seen == [0, 1]
        assert [_body(json.loads(e))["n"] for e in r.lrange("gb", 0, -1)] == [2]
        recorded = [_body(json.loads(record)[0])["n"] for record in r.hvals("unacked")]
        assert sorted(recorded) == [0, 1] and r.zcard("unacked_index") == 2
    assert sorted(_body(json.loads(e))["n"] for e in r.lrange("gb", 0, -1)) == [0, 1, 2]
    assert r.hlen("unacked") == r.zcard("unacked_index") == 0
    r.flushdb()


def _body(message: dict) -> dict:
    return json.loads(base64.b64decode(message["body"]))


def test_an_unacked_record_kombu_could_not_restore_is_set_aside_not_raised(redis_url):
    """A record Python's JSON refuses (Redis's Lua parser took it at the pop; the worker died
    before judging it) or one routed to no queue goes to `unacked.undeliverable`; a sound one
    next to them is restored to its queue as kombu restores it."""
    import redis
    from kombu import Connection

    db = redis_url.rsplit("/", 1)[0] + "/8"
    r = redis.Redis.from_url(db)
    r.flushdb()
    sound = {"body": "e30=", "headers": {}, "properties": {"delivery_tag": "ok", "delivery_info": {}}}
    records = {
        "hex": b'[{"n": 0x10}, "", "q"]',  # cjson reads 0x10; Python does not
        "lost": json.dumps([sound, "no-such-exchange", "q"]).encode(),
        "ok": json.dumps([sound, "", "q"]).encode(),
    }
    for tag, record in records.items():
        r.hset("unacked", tag, record)
        r.zadd("unacked_index", {tag: 1.0})
    with Connection(db, transport=broker.Transport) as conn:
        qos = conn.default_channel.qos
        for tag in records:
            qos.restore_by_tag(tag)
    assert r.hlen("unacked") == r.zcard("unacked_index") == 0
    assert sorted(r.lrange("unacked.undeliverable", 0, -1)) == sorted([records["hex"], records["lost"]])
    (restored,) = r.lrange("q", 0, -1)
    assert json.loads(restored)["properties"]["delivery_tag"] == "ok"
    r.flushdb()
