"""The reliable Redis pop: a killed consumer's in-flight message goes back on the queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from celery import Celery

from worker import broker


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
