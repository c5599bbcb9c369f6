"""A `sidecar capture` process SIGKILLed during 2,000 updates of the application's table, with a
real worker embedding behind it: at the end the collection equals the table (doc ids and texts)
and the ledger equals the emulator's bill."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import pytest
import sqlalchemy as sa
from qdrant_client import QdrantClient

from tests.fixtures.worker_process import ROOT, SidecarWorker
from tests.test_capture_postgres import app_dsn, run_sql  # noqa: F401 (app_dsn is a fixture)

ROWS = 150
UPDATES = 2000


def start_capture(worker: SidecarWorker, sources: str, log_path) -> subprocess.Popen[bytes]:
    env = {
        **worker.env,
        "SIDECAR_CAPTURE_SNAPSHOT_LANE": "realtime",
        "SIDECAR_CAPTURE_BATCH_ROWS": "100",
        "SIDECAR_CAPTURE_IDLE_S": "0.2",
    }
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", "capture", "--sources", sources],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def table_texts(dsn: str) -> dict[str, str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, title, body FROM articles")
            return {f"a-{i}": f"{t}\n\n{b}" for i, t, b in cur.fetchall()}
    finally:
        conn.close()


def digest(texts: dict[str, str]) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in texts.items()}


@pytest.mark.slow
def test_sigkill_during_2000_updates_loses_and_doubles_nothing(
    app_dsn,  # noqa: F811
    postgres_url,
    redis_url,
    redis_client,
    emulator,
    tmp_path,
):
    run_sql(
        app_dsn,
        "INSERT INTO articles (id, title, body) "
        f"SELECT i, 'row ' || i, 'first text' FROM generate_series(1, {ROWS}) i",
    )
    sources = tmp_path / "sources.toml"
    sources.write_text(
        f'[[sources]]\nname = "articles"\nkind = "postgres"\ndsn = "{app_dsn}"\ntable = "public.articles"\n'
        'collection = "articles"\ndoc_id = "a-{id}"\ntext = "{title}\\n\\n{body}"\n'
    )
    worker = SidecarWorker(tmp_path, database_url=postgres_url, broker_url=redis_url, emulator=emulator)
    # A worker cycle that meets a deadlock (its finish against the capture's accept) keeps its
    # leases until they expire: short leases, so the test does not wait out the default 120 s.
    worker.env["SIDECAR_LEASE_S"] = "10"
    worker.start()
    capture_log = tmp_path / "capture.log"
    capture = start_capture(worker, str(sources), capture_log)
    engine = sa.create_engine(postgres_url)
    kills = 0
    try:
        done = threading.Event()

        def update() -> None:
            conn = psycopg2.connect(app_dsn)
            conn.autocommit = True
            rng = random.Random(7)
            with conn.cursor() as cur:
                for n in range(UPDATES):
                    cur.execute(
                        "UPDATE articles SET body = %s WHERE id = %s", (f"revision {n}", rng.randint(1, ROWS))
                    )
                    time.sleep(0.01)
            conn.close()
            done.set()

        def rows_committed() -> int:
            """Rows the capture committed while streaming (0 during its first snapshot)."""
            with engine.connect() as conn:
                found = conn.execute(sa.text("select phase, rows_total from capture_sources")).one_or_none()
            return int(found.rows_total) if found is not None and found.phase == "streaming" else 0

        # Every update after the snapshot's consistent point, so each one is streamed (and counted).
        worker.wait_for(lambda: rows_committed() >= ROWS, timeout_s=60, what="the snapshot")
        updater = threading.Thread(target=update)
        updater.start()
        while not done.is_set():
            # Kill only a capture that is streaming: its rows keep being committed.
            seen = rows_committed()
            while not done.is_set() and rows_committed() < max(seen, ROWS) + 100:
                time.sleep(0.05)
            if done.wait(random.uniform(0.0, 0.5)):
                break
            capture.send_signal(signal.SIGKILL)
            capture.wait()
            kills += 1
            capture = start_capture(worker, str(sources), capture_log)
        updater.join()
        expected = table_texts(app_dsn)

        def caught_up() -> bool:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text("select doc_id, text, status from documents where collection = 'articles'")
                ).all()
            return {d: t for d, t, _ in rows} == expected and all(s == "indexed" for *_, s in rows)

        worker.wait_for(caught_up, timeout_s=120, what="capture and the worker to catch up")
    finally:
        capture.send_signal(signal.SIGTERM)
        try:
            capture.wait(20)
        except subprocess.TimeoutExpired:
            capture.kill()
        worker.stop()
    assert kills >= 2, "the updates ended before the capture could be killed twice"

    with engine.connect() as conn:
        ledger = conn.execute(
            sa.text("select provider_request_id, billed_tokens from provider_requests")
        ).all()
        errors = conn.execute(sa.text("select errors_total, rows_total from capture_sources")).one()
    engine.dispose()
    bill = emulator.bill()
    assert sum(r.billed_tokens for r in ledger) == bill["total_tokens"]
    assert sorted(r.provider_request_id for r in ledger) == sorted(b["request_id"] for b in bill["requests"])
    assert errors.rows_total >= ROWS + UPDATES  # a killed batch is read again (at least once)

    client = QdrantClient(path=worker.env["SIDECAR_QDRANT_PATH"])
    try:
        points, _ = client.scroll("articles", limit=10 * ROWS, with_payload=True)
    finally:
        client.close()
    live = {p.payload["doc_id"]: p.payload["text"] for p in points if not p.payload.get("deleted")}
    assert digest(live) == digest(expected)
    assert "revision" not in capture_log.read_text()  # no document text in the capture's log
