"""The batch lane in-process on real parts: SQL (SQLite and PostgreSQL), Qdrant, HTTP to the
emulator's Batch API. Crash tests stop a lane at a step, as if its process died there, and let
another lane (another owner) finish the job after the lease runs out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from api.emulator import expected_vector
from tests.test_pipeline import drain
from worker import pipeline
from worker.batch.lane import BatchLane
from worker.batch.packing import enqueue
from worker.ledger import billing, budget, reports, spending
from worker.sql.batch_models import BatchJob, BatchLine
from worker.sql.models import Document, ProviderRequest
from worker.tasks import ingest_events

FAST = {"batch_collect_s": 0.0, "batch_poll_interval_s": 0.05}


def events(n: int, lane: str = "batch", prefix: str = "d", version: int | None = None) -> list[dict]:
    out = []
    for i in range(n):
        event = {
            "op": "upsert",
            "doc_id": f"{prefix}{i}",
            "text": f"{prefix} text number {i} about tea",
            "lane": lane,
        }
        if version is not None:
            event["version"] = version
        out.append(event)
    return out


def drive(lane: BatchLane, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Tick the lane until `done()`; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("the batch lane did not finish in time")
        lane.tick()
        time.sleep(0.05)


def statuses(rt) -> dict[str, str]:
    with rt.sessions() as session:
        return dict(session.execute(sa.select(Document.doc_id, Document.status)).all())


def all_indexed(rt) -> Callable[[], bool]:
    return lambda: set(statuses(rt).values()) == {"indexed"}


def balanced(rt, emulator) -> billing.BillReport:
    with rt.sessions() as session:
        return billing.reconcile(session, emulator.bill()["requests"])


@pytest.fixture()
def lanes():
    made: list[BatchLane] = []

    def make(rt, owner: str | None = None) -> BatchLane:
        lane = BatchLane(rt, owner=owner)
        made.append(lane)
        return lane

    yield make
    for lane in made:
        lane.client.close()


def test_batch_documents_are_embedded_by_one_job_at_the_batch_price(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=0.2)
    rt = make_runtime(**FAST)
    ingest_events(rt, events(30) + events(5, lane="realtime", prefix="r"))
    drain(rt)  # the real-time loop takes only the real-time documents
    assert sorted(d for d, s in statuses(rt).items() if s == "indexed") == [f"r{i}" for i in range(5)]

    drive(lanes(rt), all_indexed(rt))
    points = rt.store.document_points("documents", "default", "d7")
    expected = expected_vector(rt.embedder.model, rt.embedder.dimensions, "d text number 7 about tea")
    assert max(abs(a - b) for a, b in zip(points[0].vector, expected, strict=True)) < 1e-6
    with rt.sessions() as session:
        row = session.execute(sa.select(ProviderRequest).where(ProviderRequest.lane == "batch")).scalar_one()
        job = session.execute(sa.select(BatchJob)).scalar_one()
        line_ids = session.execute(sa.select(BatchLine.provider_request_id)).scalars().all()
        by_lane = {r["lane"]: r for r in spending.spend(session, by="lane")["rows"]}
    assert (job.state, job.lines, job.completed_lines, job.provider_batch_id) == (
        "done",
        30,
        30,
        row.provider_request_id,
    )
    assert row.status == "succeeded" and row.api == "batch" and row.rows == 30
    assert row.cost_nano_cny == row.billed_tokens * 250  # half of v4's 500 nano-CNY per token
    bill = emulator.bill()["requests"]
    batch_bill = [b for b in bill if b.get("api") == "batch"]
    assert len(batch_bill) == 30 and sum(b["tokens"] for b in batch_bill) == row.billed_tokens
    assert set(line_ids) == {b["request_id"] for b in batch_bill}  # each line's request id kept
    assert by_lane["batch"]["tokens"] == row.billed_tokens and by_lane["realtime"]["requests"] == 1
    report = balanced(rt, emulator)
    assert report.balanced, report.as_dict()
    assert report.ledger_tokens == emulator.bill()["total_tokens"]
    with rt.sessions() as session:
        status = reports.status(session, rt.settings)["batch"]
    assert status == {
        "available": True,
        "fallback_reason": None,
        "jobs": {"done": 1},
        "waiting_documents": 0,
        "lines_running": 0,
    }


def test_a_newer_realtime_version_wins_over_a_running_job(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=1.0)
    rt = make_runtime(**FAST)
    ingest_events(rt, events(3, version=1))
    lane = lanes(rt)
    lane.tick()  # packed, uploaded, submitted
    with rt.sessions() as session:
        assert session.execute(sa.select(BatchJob.state)).scalar_one() == "submitted"
    ingest_events(rt, [{"op": "upsert", "doc_id": "d1", "text": "the realtime rewrite", "version": 2}])
    drain(rt)
    drive(lane, all_indexed(rt))
    with rt.sessions() as session:
        doc = session.execute(sa.select(Document).where(Document.doc_id == "d1")).scalar_one()
    assert (doc.version, doc.indexed_version, doc.lane) == (2, 2, "realtime")
    points = rt.store.document_points("documents", "default", "d1")
    assert [p.payload["version"] for p in points] == [2]
    assert balanced(rt, emulator).balanced


def test_failed_and_expired_lines_are_sent_again(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=0.1, batch_fail_rate=0.3, batch_expire_rate=0.5, seed=3)
    rt = make_runtime(**FAST)
    ingest_events(rt, events(40))
    drive(lanes(rt), all_indexed(rt), timeout_s=60)
    with rt.sessions() as session:
        jobs = session.execute(sa.select(BatchJob)).scalars().all()
    assert len(jobs) > 1 and sum(j.failed_lines for j in jobs) > 0
    assert sum(j.completed_lines for j in jobs) == 40  # each text paid for once
    report = balanced(rt, emulator)
    assert report.balanced, report.as_dict()


def test_a_text_the_provider_refuses_is_a_dead_letter(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=0.1)
    rt = make_runtime(**FAST)
    bad = {"op": "upsert", "doc_id": "bad", "text": "hello <<BLOCKED>>", "lane": "batch"}
    ingest_events(rt, [*events(3), bad])
    drive(lanes(rt), lambda: "pending" not in statuses(rt).values())
    assert statuses(rt) == {"d0": "indexed", "d1": "indexed", "d2": "indexed", "bad": "dead"}


@pytest.mark.parametrize("point", ["after_upload", "after_create", "after_record"])
def test_a_crash_at_any_step_loses_nothing_and_pays_once(make_runtime, emulator, lanes, point):
    emulator.configure(batch_duration_s=0.1)
    rt = make_runtime(lease_s=0.5, **FAST)
    ingest_events(rt, events(12))
    first = lanes(rt, owner="first")
    first.crash_at = point
    with pytest.raises(SystemExit):
        drive(first, lambda: False, timeout_s=10)
    time.sleep(0.6)  # the dead lane's job lease runs out
    drive(lanes(rt, owner="second"), all_indexed(rt))
    assert len(emulator.client.get("/_emulator/bill").json()["requests"]) == 12  # paid once
    jobs = emulator.client.get(
        "/compatible-mode/v1/batches", headers={"Authorization": f"Bearer {emulator.api_key}"}
    ).json()["data"]
    assert len(jobs) == 1  # the job was found again, never created twice
    report = balanced(rt, emulator)
    assert report.balanced, report.as_dict()


def test_where_the_batch_api_is_not_offered_the_lane_falls_back_to_realtime(
    make_runtime, emulator, lanes, caplog
):
    rt = make_runtime(region="singapore", **FAST)
    ingest_events(rt, events(4))
    tick = lanes(rt).tick()
    assert tick.moved_to_realtime == 4
    with rt.sessions() as session:
        status = reports.status(session, rt.settings)["batch"]
    assert status["available"] is False and "singapore" in status["fallback_reason"]
    assert "batch.unavailable" in caplog.text and "singapore" in caplog.text
    drain(rt)
    assert set(statuses(rt).values()) == {"indexed"}


def test_the_budget_holds_a_job_back_at_the_batch_price(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=0.1)
    rt = make_runtime(**FAST, budget_daily_cny="0.000001")
    ingest_events(rt, events(10))
    assert lanes(rt).tick().packed is None
    with rt.sessions() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(BatchJob)).scalar_one() == 0
        assert budget.budget_state(session, rt.settings)["caps"][0]["spent_nano_cny"] == 0
    assert set(statuses(rt).values()) == {"pending"}


def test_enqueue_sends_existing_documents_through_the_batch_lane(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=0.1)
    rt = make_runtime(**FAST)
    ingest_events(rt, events(3, lane="realtime"))
    drain(rt)
    with rt.sessions.begin() as session:
        ids = session.execute(sa.select(Document.id)).scalars().all()
        assert enqueue(session, list(ids)) == 3
    assert pipeline.run_cycle(rt).idle  # not the real-time lane's any more
    drive(lanes(rt), all_indexed(rt))
    with rt.sessions() as session:
        job = session.execute(sa.select(BatchJob)).scalar_one()
    assert (job.lines, job.state) == (0, "done")  # the vectors were paid for already: no job sent


def test_spend_by_lane_over_http(make_runtime, emulator, lanes):
    from fastapi.testclient import TestClient

    from api.app import create_app

    emulator.configure(batch_duration_s=0.1)
    rt = make_runtime(api_tokens="tok", **FAST)
    ingest_events(rt, events(4) + events(2, lane="realtime", prefix="r"))
    drain(rt)
    drive(lanes(rt), all_indexed(rt))
    with TestClient(create_app(rt.settings, runtime=rt)) as http:
        answer = http.get("/v1/spend?group_by=lane", headers={"Authorization": "Bearer tok"})
    assert answer.status_code == 200, answer.text
    rows = {row["lane"]: row for row in answer.json()["rows"]}
    assert set(rows) == {"batch", "realtime"} and rows["batch"]["requests"] == 1


def test_result_lines_the_lane_cannot_use_count_as_failed():
    from worker.batch.importing import read_files

    def ok(custom_id: str, vector: list, usage: object = None) -> bytes:
        body = {"data": [{"embedding": vector}], "usage": usage or {"prompt_tokens": 3}}
        line = {
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"r-{custom_id}", "body": body},
        }
        return json.dumps(line).encode()

    output = b"\n".join(
        [
            ok("good", [0.1, 0.2]),
            ok("short", [0.1]),
            ok("nan", [0.1, float("nan")]),
            ok("no-usage", [0.1, 0.2], usage={"x": 1}),
            b"not json at all",
            b'{"no": "custom_id"}',
            b"\xff\xfe",
        ]
    )
    error = json.dumps(
        {
            "custom_id": "refused",
            "response": {"status_code": 400, "request_id": "r-x"},
            "error": {"code": "data_inspection_failed"},
        }
    ).encode()
    answers = read_files(output, error, dimensions=2)
    assert set(answers.vectors) == {"good"} and answers.tokens == {"good": 3}
    assert set(answers.errors) == {"short", "nan", "no-usage", "refused"}
    assert answers.errors["refused"][0] == 400 and "data_inspection_failed" in answers.errors["refused"][1]
