"""The embedded SQLite broker (worker/embedded_broker.py) on a real file, with a real SIGKILL: the
messages a killed consumer held are delivered again, acknowledged ones leave no row."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Connection

from tests.fixtures.worker_process import SidecarWorker
from worker.embedded_broker import STATE_TABLE, Transport

TAKE_TWO_AND_DIE = """
import os, signal, sys
from kombu import Connection
from worker.embedded_broker import Transport
with Connection(sys.argv[1], transport=Transport) as conn:
    queue = conn.SimpleQueue("q")
    queue.consumer.qos(prefetch_count=2)  # one take hands out both, the third stays
    for _ in range(2):
        print(queue.get(timeout=10).payload["n"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def visible(path: Path) -> list[bool]:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT visible FROM kombu_message ORDER BY id")).scalars()
            return [bool(v) for v in rows]
    finally:
        engine.dispose()


def drain(url: str, *, transport: type | None = Transport, marks: bool = False) -> list[Any]:
    """Take and acknowledge every message of queue q: its n (and whether it came marked
    redelivered, with `marks`)."""
    taken = []
    with Connection(url, transport=transport) as conn:
        queue = conn.SimpleQueue("q")
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                return taken
            redelivered = bool(message.delivery_info.get("redelivered"))
            taken.append((message.payload["n"], redelivered) if marks else message.payload["n"])
            message.ack()


def test_a_killed_consumers_messages_are_delivered_again_and_acknowledged_ones_deleted(tmp_path):
    path = tmp_path / "broker.sqlite"
    url = f"sqlite:///{path}"
    with Connection(url, transport=Transport) as conn:
        queue = conn.SimpleQueue("q")
        for n in range(3):
            queue.put({"n": n})
    died = subprocess.run(
        [sys.executable, "-c", TAKE_TWO_AND_DIE, url], capture_output=True, text=True, timeout=60
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert died.stdout.split() == ["0", "1"]
    assert visible(path) == [False, False, True]  # taken, never acknowledged
    # The two come back, marked as kombu's Redis transport marks what it restores (a message
    # that kills the worker each time is so counted and dead-lettered, worker/tasks.py).
    assert sorted(drain(url, marks=True)) == [(0, True), (1, True), (2, False)]
    assert visible(path) == []  # acknowledged rows are deleted


def test_a_take_hands_out_several_and_gives_back_what_a_failed_delivery_left(tmp_path):
    """One take, three messages (no prefetch limit); the consumer raises on the first: the two
    taken after it are visible again, and the next take delivers them."""
    path = tmp_path / "broker.sqlite"
    url = f"sqlite:///{path}"
    seen: list[int] = []

    def fail_first(body: dict, message: Any) -> None:
        seen.append(body["n"])
        if body["n"] == 0:
            assert visible(path) == [False, False, False]  # all three in one take
            raise RuntimeError("the consumer fails")
        message.ack()

    with Connection(url, transport=Transport) as conn:
        queue = conn.SimpleQueue("q")
        for n in range(3):
            queue.put({"n": n})
        with conn.Consumer(queue.queue, callbacks=[fail_first], accept=["json"]):
            with pytest.raises(RuntimeError):
                conn.drain_events(timeout=5)
            assert visible(path) == [False, True, True]
            conn.drain_events(timeout=5)  # the next take hands out both
    assert seen == [0, 1, 2]


def test_rows_kombus_own_transport_left_invisible_are_deleted_once_not_run_again(tmp_path):
    path = tmp_path / "broker.sqlite"
    url = f"sqlite:///{path}"
    with Connection(f"sqla+{url}") as conn:  # kombu's own transport: an acknowledged row stays
        queue = conn.SimpleQueue("q")
        for n in range(2):
            queue.put({"n": n})
        queue.get(timeout=5).ack()
    assert visible(path) == [False, True]
    assert drain(url) == [1]  # the old invisible row is gone, not delivered
    assert visible(path) == []
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT name FROM {STATE_TABLE}")).scalars().all() == [
            "deletes-acked-rows"
        ]
    engine.dispose()


@pytest.mark.parametrize("requeue", [True, False])
def test_a_rejected_message_leaves_one_row_or_none(tmp_path, requeue):
    path = tmp_path / "broker.sqlite"
    url = f"sqlite:///{path}"
    with Connection(url, transport=Transport) as conn:
        queue = conn.SimpleQueue("q")
        queue.put({"n": 7})
        queue.get(timeout=5).reject(requeue=requeue)
    assert visible(path) == ([True] if requeue else [])
    assert drain(url) == ([7] if requeue else [])


def test_a_worker_killed_holding_messages_loses_none_on_the_embedded_broker(tmp_path, sqlite_url, emulator):
    """A real `sidecar worker` on the SQLite broker takes messages, is SIGKILLed before it can
    record them (the test holds the database's write lock), and its restart records them all."""
    broker = tmp_path / "broker.sqlite"
    worker = SidecarWorker(
        tmp_path, database_url=sqlite_url, broker_url=f"sqla+sqlite:///{broker}", emulator=emulator
    )
    worker.start()
    database = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    try:
        database.execute("BEGIN IMMEDIATE")  # ingest tasks now wait, holding their messages
        producer = worker.producer()
        for n in range(6):
            producer.send_task(
                "sidecar.ingest", args=[{"op": "upsert", "doc_id": f"d{n}", "text": f"text {n}"}]
            )
        worker.wait_for(lambda: False in visible(broker), timeout_s=30, what="the worker to take messages")
        assert worker.proc is not None
        worker.proc.kill()
        worker.proc.wait(30)
    finally:
        database.close()  # the lock goes with it
    worker.start()

    def indexed() -> bool:
        engine = sa.create_engine(sqlite_url)
        try:
            with engine.connect() as conn:
                statuses = conn.execute(sa.text("SELECT status FROM documents")).scalars().all()
        finally:
            engine.dispose()
        return sorted(statuses) == ["indexed"] * 6

    try:
        worker.wait_for(indexed, timeout_s=60, what="all six documents indexed")
        assert "broker.restored" in worker.log()
        worker.wait_for(
            lambda: visible(broker) == [], timeout_s=30, what="every row acknowledged and deleted"
        )
    finally:
        worker.stop()


@pytest.mark.parametrize("payload", ["not json \x01", '{"body": 1}', "[1, 2]", '{"properties": {}}'])
def test_a_row_that_is_no_kombu_message_is_handed_over_as_undeliverable_then_deleted(tmp_path, payload):
    path = tmp_path / "broker.sqlite"
    url = f"sqlite:///{path}"
    with Connection(url, transport=Transport) as conn:
        conn.SimpleQueue("q").put({"n": 1})
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a producer writing rows by hand
        conn.execute(
            sa.text(
                "INSERT INTO kombu_message (visible, timestamp, payload, version, queue_id) "
                "SELECT 1, NULL, :payload, 1, id FROM kombu_queue WHERE name = 'q'"
            ),
            {"payload": payload},
        )
    engine.dispose()
    with Connection(url, transport=Transport) as conn:
        queue = conn.SimpleQueue("q")
        taken = [queue.get(timeout=5), queue.get(timeout=5)]
        for message in taken:
            message.ack()
    good, bad = taken  # in the order they were written
    assert good.payload == {"n": 1}
    assert bad.headers["task"] == "sidecar.undeliverable"
    (argument,), _kwargs, _options = bad.decode()
    assert argument["queue"] == "q" and argument["reason"]
    assert visible(path) == []
