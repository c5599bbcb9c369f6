"""`sidecar reembed` as a process: killed in the middle of its backfill, re-run, it continues
where it stopped (marks in SQL, vectors from the embedding cache) and switches; `--finalize`;
`sidecar status --json` shows the migration; what it cannot do is refused with a reason (the
batch lane where the Batch API is not offered, no model, a size the model lacks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from tests.fixtures.runtime import make_settings
from worker import pipeline
from worker.runtime import build_runtime
from worker.sql import schema
from worker.sql.models import Document, ProviderRequest
from worker.sql.reembed_models import MigrationMark
from worker.tasks import ingest_events

ROOT = Path(__file__).resolve().parents[1]
V3 = "documents__text_embedding_v3__512__2"


def cli_env(settings, emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_") and k != "DASHSCOPE_API_KEY"}
    env.update(
        SIDECAR_DATA_DIR=str(settings.data_dir),
        SIDECAR_DATABASE_URL=settings.resolved_database_url(),
        SIDECAR_DASHSCOPE_URL=emulator.url,
        DASHSCOPE_API_KEY="sk-emulator",
        SIDECAR_CLAIM_DOCS="10",  # one provider call per follower step
        SIDECAR_REEMBED_SETTLE_S="0.2",
        SIDECAR_REEMBED_ROUTE_REFRESH_S="0.1",
        PYTHONPATH=str(ROOT),
    )
    return env


def sidecar(env, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        cwd=env["SIDECAR_DATA_DIR"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def marks(engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(MigrationMark)).scalar_one())


def test_killed_reembed_continues_where_it_stopped(database_url, emulator, tmp_path):
    settings = make_settings(database_url, emulator.url, tmp_path)
    schema.upgrade(settings.resolved_database_url())
    rt = build_runtime(settings)  # Qdrant Edge in the data dir, as the CLI will open it
    ingest_events(
        rt, [{"op": "upsert", "doc_id": f"d{i}", "text": f"text number {i} on tea"} for i in range(80)]
    )
    while not pipeline.run_cycle(rt).idle:
        pass
    engine = rt.engine
    rt.close()
    env = cli_env(settings, emulator)
    emulator.configure(latency_ms=150)

    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api.cli",
            "reembed",
            "documents",
            "--model",
            "text-embedding-v3",
            "--dimensions",
            "512",
        ],
        env=env,
        cwd=env["SIDECAR_DATA_DIR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while marks(engine) < 20:
        assert run.poll() is None, "reembed ended before it could be killed"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(10)
    done_before = marks(engine)
    assert 20 <= done_before < 80

    emulator.configure(latency_ms=0)
    again = sidecar(env, "reembed", "documents", "--model", "text-embedding-v3", "--dimensions", "512")
    assert again.returncode == 0, again.stderr
    assert f"switched (documents → {V3})" in again.stdout
    assert "documents" in again.stderr  # progress lines

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(sa.func.sum(ProviderRequest.rows), sa.func.count()).where(
                ProviderRequest.migration == V3
            )
        ).one()
        assert conn.execute(sa.select(sa.func.count()).select_from(Document)).scalar_one() == 80
    # Each text paid once, but for the call in flight when the process was killed (≤ one batch).
    assert 80 <= rows[0] <= 90

    status = sidecar(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    (mig,) = json.loads(status.stdout)["migrations"]
    assert {k: mig[k] for k in ("collection", "to", "state", "done", "total")} == {
        "collection": "documents",
        "to": V3,
        "state": "switched",
        "done": 80,
        "total": 80,
    }
    final = sidecar(env, "reembed", "documents", "--finalize")
    assert final.returncode == 0, final.stderr
    assert "finalized" in final.stdout
    text = sidecar(env, "status")
    assert "finalized" in text.stdout

    rt = build_runtime(settings)
    try:
        assert rt.store.aliases() == {"documents": V3}
        assert not rt.store.exists("documents__text_embedding_v4__1024__1")
        assert rt.store.count("documents") == 80
    finally:
        rt.close()
    engine.dispose()


def test_reembed_refuses_what_it_cannot_do(database_url, emulator, tmp_path):
    settings = make_settings(database_url, emulator.url, tmp_path)
    schema.upgrade(settings.resolved_database_url())
    env = cli_env(settings, emulator)
    singapore = {**env, "SIDECAR_REGION": "singapore"}
    batch = sidecar(
        singapore,
        "reembed",
        "documents",
        "--model",
        "text-embedding-v3",
        "--dimensions",
        "512",
        "--lane",
        "batch",
    )
    assert batch.returncode == 2 and "--lane batch is not available" in batch.stderr, batch.stderr
    missing = sidecar(env, "reembed", "documents")
    assert missing.returncode == 2 and "--model" in missing.stderr
    empty = sidecar(env, "reembed", "documents", "--model", "text-embedding-v3", "--dimensions", "512")
    assert empty.returncode == 2 and "no documents" in empty.stderr and "Traceback" not in empty.stderr
    wrong = sidecar(env, "reembed", "documents", "--model", "text-embedding-v3", "--dimensions", "333")
    assert wrong.returncode == 2 and "333" in wrong.stderr and "Traceback" not in wrong.stderr
    nothing = sidecar(env, "reembed", "documents", "--rollback")
    assert nothing.returncode == 2 and "no migration" in nothing.stderr
