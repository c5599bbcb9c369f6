"""Flower and celery-exporter see our tasks: a standard events consumer (`celery.events.EventReceiver`
on the Redis broker, what both tools run) receives task-sent from the producer (the API's Celery
app), then task-received, task-succeeded, and task-failed for a message that went to the dead
letters, from a real `sidecar worker` process."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery

from tests.fixtures.worker_process import SidecarWorker
from worker.settings import Settings
from worker.tasks import create_celery

pytestmark = pytest.mark.slow


class Events:
    """Task events captured by a receiver thread, as Flower's and celery-exporter's do."""

    def __init__(self, app: Celery) -> None:
        self.seen: list[dict[str, Any]] = []
        self._app = app
        self._receiver: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def __enter__(self) -> Events:
        self._thread.start()
        assert self._ready.wait(10), "the events receiver did not start"
        # Subscribed once a worker's heartbeat arrives (`wakeup` asks for one at once): events
        # published before that would be missed, as by any late-starting monitor.
        deadline = time.monotonic() + 30
        while not any(e["type"].startswith("worker-") for e in list(self.seen)):
            assert time.monotonic() < deadline, "no worker heartbeat reached the events receiver"
            time.sleep(0.05)
        return self

    def _capture(self) -> None:
        with self._app.connection_for_read() as conn:
            self._receiver = self._app.events.Receiver(conn, handlers={"*": self.seen.append})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=True)

    def __exit__(self, *exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)

    def of(self, task_id: str) -> list[str]:
        return [e["type"] for e in list(self.seen) if e.get("uuid") == task_id]

    def wait_for(self, task_id: str, kinds: set[str], worker: SidecarWorker) -> list[str]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if kinds <= set(self.of(task_id)):
                return self.of(task_id)
            assert worker.alive(), worker.log()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"events for {task_id}: {self.of(task_id)}, wanted {sorted(kinds)}")


def test_an_events_consumer_sees_sent_received_succeeded_and_failed(
    tmp_path, sqlite_url, redis_url, emulator
):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    worker = SidecarWorker(tmp_path, database_url=sqlite_url, broker_url=redis_url, emulator=emulator)
    worker.start()
    # The producer is the API's app (create_celery): it sends task-sent (task_send_sent_event).
    producer = create_celery(Settings(_env_file=None, data_dir=tmp_path, broker_url=redis_url))
    try:
        with Events(producer) as events:
            good = producer.send_task("sidecar.ingest", args=[{"op": "upsert", "doc_id": "a", "text": "tea"}])
            kinds = events.wait_for(good.id, {"task-sent", "task-received", "task-succeeded"}, worker)
            assert "task-failed" not in kinds
            # A call of the wrong shape is recorded as a dead letter: failed, for the monitors.
            bad = producer.send_task("sidecar.ingest", args=["one", "two"])
            kinds = events.wait_for(bad.id, {"task-sent", "task-received", "task-failed"}, worker)
            assert "task-succeeded" not in kinds
            failed = next(e for e in events.seen if e.get("uuid") == bad.id and e["type"] == "task-failed")
            assert "DeadLettered" in failed["exception"] and "one positional argument" in failed["exception"]
        assert "Traceback" not in worker.log()  # an expected failure (throws): no traceback logged
    finally:
        producer.close()
        worker.stop()


def test_task_events_go_out_in_bunches_not_a_publish_per_message(tmp_path, sqlite_url, redis_url, emulator):
    """worker/consumer.py: 40 messages, every one's received and succeeded events arrive, in far
    fewer publishes than messages (Celery's own consumer publishes about once per message): a
    subscriber counts what the worker publishes on the events exchange's `task.multi` channel."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    worker = SidecarWorker(tmp_path, database_url=sqlite_url, broker_url=redis_url, emulator=emulator)
    worker.start()
    producer = create_celery(Settings(_env_file=None, data_dir=tmp_path, broker_url=redis_url))
    published = client.pubsub(ignore_subscribe_messages=True)
    published.psubscribe("*celeryev/task.multi")
    try:
        with Events(producer) as events:
            while published.get_message(timeout=0.01) is not None:  # the worker's start
                pass
            bodies = [{"op": "upsert", "doc_id": f"d{i}", "text": "tea"} for i in range(40)]
            sent = [producer.send_task("sidecar.ingest", args=[body]) for body in bodies]
            for result in sent:
                events.wait_for(result.id, {"task-received", "task-succeeded"}, worker)
            publishes = 0
            while published.get_message(timeout=0.5) is not None:
                publishes += 1
        # Celery's own consumer: a publish per message or more (55 for these 40). Ours: one per
        # 0.1 s or 24 events, so a slow machine that takes 1.5 s over the 40 sees 15.
        assert 0 < publishes <= len(sent) // 2, f"{publishes} publishes for {len(sent)} messages"
    finally:
        published.close()
        producer.close()
        worker.stop()
