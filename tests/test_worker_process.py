"""End to end: a real `sidecar worker` process on a real Redis broker, events from a plain Celery client.

The publisher imports nothing from the project (a producer in another application would not),
the worker talks HTTP to the emulator, and afterwards Qdrant, the ledger and the emulator's
bill are compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from qdrant_client import QdrantClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def wait_for(
    condition, *, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"worker exited ({proc.returncode}) while waiting for {what}:\n"
                f"{log.read_text()[-4000:] if log else ''}"
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-4000:] if log else ''}")


def make_worker_env(tmp_path, database_url, redis_url, emulator) -> dict[str, str]:
    """The worker's environment on the test's Redis database (flushed) as broker, migrated."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    env = {
        **os.environ,
        "SIDECAR_DATA_DIR": str(tmp_path),
        "SIDECAR_BROKER_URL": redis_url,
        "SIDECAR_DATABASE_URL": database_url,
        "SIDECAR_QDRANT_PATH": str(tmp_path / "qdrant"),
        "DASHSCOPE_API_KEY": emulator.api_key,
        "SIDECAR_DASHSCOPE_URL": emulator.url,
        "SIDECAR_BATCH_MAX_DELAY_S": "0.2",
    }
    env.pop("SIDECAR_QDRANT_URL", None)
    subprocess.run(
        [sys.executable, "-m", "api.cli", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True
    )
    return env


@pytest.fixture()
def worker_env(tmp_path, database_url, redis_url, emulator):
    return make_worker_env(tmp_path, database_url, redis_url, emulator)


def start_worker(env, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", "worker", "--loglevel", "INFO"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_worker(proc: subprocess.Popen) -> None:
    from api.cli.demo import stop  # SIGTERM, then SIGKILL after 30 s

    stop(proc)


def test_events_to_qdrant_and_ledger_matching_the_bill(worker_env, tmp_path, emulator):
    env = worker_env
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    producer = Celery(broker=env["SIDECAR_BROKER_URL"])
    producer.conf.task_serializer = "json"
    try:
        events = [
            {
                "op": "upsert",
                "doc_id": f"doc-{i}",
                "version": 1,
                "text": f"Note {i}: tea and maps.",
                "metadata": {"n": i},
            }
            for i in range(40)
        ]
        events += [
            {"op": "upsert", "doc_id": "doc-3", "version": 2, "text": "Note 3, rewritten."},
            {"op": "delete", "doc_id": "doc-5", "version": 2},
            {"op": "upsert", "doc_id": "doc-7", "version": 0, "text": "older, ignored"},
            {"op": "upsert", "doc_id": "bad"},  # no text: rejected, the rest flow on
            "not an object",
        ]
        producer.send_task("sidecar.ingest_many", args=[events[:20]])
        for event in events[20:]:
            producer.send_task("sidecar.ingest", args=[event])

        engine = sa.create_engine(env["SIDECAR_DATABASE_URL"])

        def settled():
            with engine.connect() as conn:
                rows = conn.execute(sa.text("select doc_id, version, status from documents")).all()
                rejected = conn.execute(sa.text("select count(*) from rejected_events")).scalar_one()
            state = {d: (v, s) for d, v, s in rows}
            return (
                len(state) == 40
                and rejected == 2
                and state["doc-3"][0] == 2
                and state["doc-5"][0] == 2
                and all(s != "pending" for _, s in state.values())
            ) and state

        state = wait_for(settled, timeout_s=60, what="all documents settled", proc=proc, log=log)
    finally:
        stop_worker(proc)

    assert state["doc-5"] == (2, "deleted")
    assert state["doc-7"] == (1, "indexed")
    assert sum(s == "indexed" for _, s in state.values()) == 39
    with engine.connect() as conn:
        ledger = conn.execute(
            sa.text("select provider_request_id, billed_tokens, rows, status from provider_requests")
        ).all()
        served = conn.execute(sa.text("select count(*) from provider_request_items")).scalar_one()
    engine.dispose()
    bill = emulator.bill()
    assert sum(r.billed_tokens for r in ledger) == bill["total_tokens"]
    assert sorted(r.provider_request_id for r in ledger) == sorted(b["request_id"] for b in bill["requests"])
    assert served == sum(r.rows for r in ledger) >= 39  # every indexed document was embedded

    client = QdrantClient(path=env["SIDECAR_QDRANT_PATH"])
    try:
        points, _ = client.scroll("documents", limit=1000, with_payload=True)
        live = [p for p in points if not p.payload.get("deleted")]
        by_doc = {p.payload["doc_id"]: p.payload for p in live}
        assert len(live) == 39 and "doc-5" not in by_doc
        assert by_doc["doc-3"]["version"] == 2 and by_doc["doc-3"]["text"] == "Note 3, rewritten."
        assert by_doc["doc-8"]["meta"] == {"n": 8} and by_doc["doc-8"]["version"] == 1
    finally:
        client.close()
    assert "tea and maps" not in log.read_text()  # document text never reaches the log
    assert emulator.api_key not in log.read_text()


def test_a_provider_cooldown_never_holds_broker_messages(worker_env, tmp_path, emulator, redis_url):
    """Every call answered 429: the limiter cools down, yet each event is accepted into SQL and
    its message acknowledged at once — ingest never waits for the provider."""
    import redis

    emulator.configure(throttle_rate=1.0)
    env = worker_env
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    producer = Celery(broker=env["SIDECAR_BROKER_URL"])
    broker = redis.Redis.from_url(env["SIDECAR_BROKER_URL"])
    engine = sa.create_engine(env["SIDECAR_DATABASE_URL"])
    try:
        for batch in range(4):
            producer.send_task(
                "sidecar.ingest_many",
                args=[
                    [
                        {"op": "upsert", "doc_id": f"c{batch}-{i}", "text": f"text {batch} {i}"}
                        for i in range(10)
                    ]
                ],
            )

        def refused() -> bool:
            return any(entry["status"] == 429 for entry in emulator.log())

        wait_for(refused, timeout_s=30, what="the provider's first 429", proc=proc, log=log)
        for batch in range(4, 8):  # published while the limiter is cooling down
            producer.send_task(
                "sidecar.ingest_many",
                args=[
                    [
                        {"op": "upsert", "doc_id": f"c{batch}-{i}", "text": f"text {batch} {i}"}
                        for i in range(10)
                    ]
                ],
            )

        def accepted_and_acked():
            with engine.connect() as conn:
                docs = conn.execute(sa.text("select count(*) from documents")).scalar_one()
            return docs == 80 and broker.llen("celery") == 0 and broker.hlen("unacked") == 0

        wait_for(
            accepted_and_acked, timeout_s=30, what="events accepted and messages acked", proc=proc, log=log
        )
        with engine.connect() as conn:
            assert (
                conn.execute(sa.text("select count(*) from documents where status = 'indexed'")).scalar_one()
                == 0
            )
    finally:
        stop_worker(proc)
        engine.dispose()


def test_no_document_text_in_the_log_even_when_a_task_retries(tmp_path, sqlite_url, redis_url, emulator):
    """The marker travels in task arguments that Celery would print: a retry (SQL failing: the
    table is renamed away for a while) and an unregistered task (whose body Celery dumps)."""
    marker = "MARKER-lapsang-souchong"
    env = make_worker_env(tmp_path, sqlite_url, redis_url, emulator)
    engine = sa.create_engine(env["SIDECAR_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(sa.text("alter table seen_events rename to seen_events_away"))
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    producer = Celery(broker=env["SIDECAR_BROKER_URL"])
    try:
        event = {"op": "upsert", "doc_id": "m1", "event_id": "e1", "text": f"{marker} in the text"}
        producer.send_task("sidecar.ingest", args=[event], kwargsrepr=marker)
        producer.send_task("sidecar.no_such_task", args=[{"text": marker}])
        wait_for(lambda: "ingest.retry" in log.read_text(), timeout_s=60, what="a retry", proc=proc, log=log)
        with engine.begin() as conn:
            conn.execute(sa.text("alter table seen_events_away rename to seen_events"))

        def settled() -> bool:
            with engine.connect() as conn:
                status = conn.execute(sa.text("select status from documents where doc_id = 'm1'")).scalar()
                rejected = conn.execute(sa.text("select field, reason from rejected_events")).all()
            return status == "indexed" and [r.field for r in rejected] == ["message"]

        wait_for(settled, timeout_s=60, what="the event indexed after its retry", proc=proc, log=log)
    finally:
        stop_worker(proc)
        engine.dispose()
    text = log.read_text()
    assert "ingest.retry task=sidecar.ingest error=OperationalError" in text
    assert "Received unregistered task of type 'sidecar.no_such_task'" in text
    assert marker not in text
