"""The embedded SQLite broker (worker/embedded_broker.py) on a real file, with a real SIGKILL: the
messages a killed consumer held are delivered again, acknowledged ones leave no row."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from kombu import Connection

from worker.embedded_broker import STATE_TABLE, Transport

TAKE_TWO_AND_DIE = """
import os, signal, sys
from kombu import Connection
from worker.embedded_broker import Transport
with Connection(sys.argv[1], transport=Transport) as conn:
    queue = conn.SimpleQueue("q")
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


def drain(url: str, *, transport: type | None = Transport) -> list[int]:
    """Take and acknowledge every message of queue q."""
    taken = []
    with Connection(url, transport=transport) as conn:
        queue = conn.SimpleQueue("q")
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                return taken
            taken.append(message.payload["n"])
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
    assert sorted(drain(url)) == [0, 1, 2]  # the two come back
    assert visible(path) == []  # acknowledged rows are deleted


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
