"""`sidecar backfill` end to end: a real `sidecar worker` process on Redis and PostgreSQL, the
emulator's Batch API over HTTP; and the worker SIGKILLed while its job is being polled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.worker_process import ROOT, SidecarWorker
from worker.sql.batch_models import BatchJob
from worker.sql.models import Document, ProviderRequest

pytestmark = pytest.mark.slow

BATCH_ENV = {"SIDECAR_BATCH_COLLECT_S": "0", "SIDECAR_BATCH_POLL_INTERVAL_S": "0.2", "SIDECAR_LEASE_S": "3"}


def write_events(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"op": "upsert", "doc_id": f"b{i}", "text": f"backfilled text {i} on tea"}) + "\n"
            )
        fh.write("not json\n")
    return path


@pytest.fixture()
def worker(tmp_path, postgres_url, redis_client, redis_url, emulator):
    running = SidecarWorker(tmp_path, database_url=postgres_url, broker_url=redis_url, emulator=emulator)
    running.env.update(BATCH_ENV)
    yield running
    running.stop()


def cli(worker: SidecarWorker, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=worker.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def ledger(postgres_url: str) -> tuple[list[ProviderRequest], dict[str, int], list[BatchJob]]:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(ProviderRequest)).all())
            docs = dict(
                conn.execute(sa.select(Document.status, sa.func.count()).group_by(Document.status)).all()
            )
            jobs = list(conn.execute(sa.select(BatchJob)).all())
    finally:
        engine.dispose()
    return rows, docs, jobs  # type: ignore[return-value]


def test_backfill_estimates_asks_publishes_and_waits(worker, tmp_path, postgres_url, emulator):
    emulator.configure(batch_duration_s=0.5)
    worker.start()
    events = write_events(tmp_path / "events.jsonl", 40)

    refused = cli(worker, "backfill", str(events))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert "cost CNY, batch" in refused.stdout and "least time, batch" in refused.stdout

    done = cli(worker, "backfill", str(events), "--yes", "--timeout-s", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published: 40 documents on the batch lane" in done.stdout
    assert "40/40 settled" in done.stdout

    rows, docs, jobs = ledger(postgres_url)
    assert docs == {"indexed": 40}
    assert [r.lane for r in rows] == ["batch"] and rows[0].status == "succeeded"
    assert len(jobs) == 1 and jobs[0].state == "done"
    bill = cli(worker, "bill", f"{emulator.url}/_emulator/bill", "--json")
    assert bill.returncode == 0, bill.stdout
    assert json.loads(bill.stdout)["balanced"] is True
    spend = json.loads(cli(worker, "spend", "--by", "lane", "--json").stdout)
    assert [r["lane"] for r in spend["rows"]] == ["batch"]
    assert spend["rows"][0]["tokens"] == emulator.bill()["total_tokens"]


def test_a_worker_killed_while_polling_loses_nothing_and_pays_once(worker, tmp_path, postgres_url, emulator):
    emulator.configure(batch_duration_s=4.0)
    worker.start()
    events = write_events(tmp_path / "events.jsonl", 25)
    assert cli(worker, "backfill", str(events), "--yes", "--no-wait").returncode == 0

    def submitted() -> bool:
        return any(job.state == "submitted" for job in ledger(postgres_url)[2])

    worker.wait_for(submitted, timeout_s=60, what="the batch job to be submitted")
    assert worker.proc is not None
    worker.proc.kill()  # SIGKILL while the job is polled
    worker.proc.wait()
    worker.start()
    worker.wait_for(lambda: ledger(postgres_url)[1] == {"indexed": 25}, timeout_s=90, what="every document")

    rows, _docs, jobs = ledger(postgres_url)
    assert len(jobs) == 1 and len(rows) == 1
    assert len(emulator.bill()["requests"]) == 25  # each line paid once
    bill = cli(worker, "bill", f"{emulator.url}/_emulator/bill", "--json")
    assert json.loads(bill.stdout)["balanced"] is True, bill.stdout
