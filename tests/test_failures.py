"""Each failure kind of spec §5 through the emulator's fault flags, on the in-process pipeline."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from worker import pipeline
from worker.ledger import reports
from worker.runtime import build_limiter
from worker.sql import pauses
from worker.sql.models import Document, ProviderRequest, utcnow
from worker.tasks import ingest_events


def run_until(rt, condition, *, cycles: int = 60):
    for _ in range(cycles):
        pipeline.run_cycle(rt)
        with rt.sessions.begin() as session:
            if condition(session):
                return
            session.execute(sa.update(Document).values(lease_until=None))  # backoffs pass at once
    raise AssertionError("condition not reached")


def statuses(session) -> list[str]:
    return sorted(session.execute(sa.select(ProviderRequest.status)).scalars())


def all_indexed(session) -> bool:
    return set(session.execute(sa.select(Document.status)).scalars()) == {"indexed"}


def ledger_tokens(session) -> int:
    return session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(ProviderRequest.billed_tokens), 0))
    ).scalar_one()


def events(n: int) -> list[dict]:
    return [{"op": "upsert", "doc_id": f"d{i}", "text": f"text number {i}"} for i in range(n)]


def test_throttling_is_retried_ledgered_at_no_cost_and_slows_the_limiter(make_runtime, emulator):
    rt = make_runtime()
    emulator.configure(throttle_rate=1.0)
    ingest_events(rt, events(3))
    pipeline.run_cycle(rt)
    with rt.sessions() as session:
        row = session.execute(sa.select(ProviderRequest)).scalar_one()
        assert (row.status, row.http_status, row.billed_tokens, row.cost_nano_cny) == ("failed", 429, 0, 0)
        assert row.error_code in ("limit_requests", "limit_burst_rate", "insufficient_quota")
    assert rt.limiter.state().cooldown_until > time.monotonic()  # every user of the limiter waits
    emulator.configure(throttle_rate=0.0)
    rt.limiter = build_limiter(rt.settings)  # a fresh limiter: no cooldown to wait out
    run_until(rt, all_indexed)
    with rt.sessions() as session:
        assert ledger_tokens(session) == emulator.bill()["total_tokens"]


def test_timeouts_are_unknown_with_their_estimate_and_retried(make_runtime, emulator):
    rt = make_runtime(request_timeout_s=0.3)
    emulator.configure(hang_rate=1.0, hang_s=1.0)
    ingest_events(rt, events(2))
    pipeline.run_cycle(rt)
    emulator.configure(hang_rate=0.0)
    run_until(rt, all_indexed)
    time.sleep(0.8)  # the hung request is billed by the emulator when it is answered
    with rt.sessions() as session:
        assert statuses(session) == ["succeeded", "unknown"]
        # The unknown row carries its estimate, which the Qwen BPE makes exact here.
        assert ledger_tokens(session) == emulator.bill()["total_tokens"]


def test_malformed_answers_never_reach_the_store(make_runtime, emulator):
    rt = make_runtime()
    emulator.configure(truncate_rate=1.0)
    ingest_events(rt, events(2))
    pipeline.run_cycle(rt)
    assert (
        rt.store.count("documents") == 0
        if "documents" in [c.name for c in rt.store.client.get_collections().collections]
        else True
    )
    emulator.configure(truncate_rate=0.0)
    run_until(rt, all_indexed)
    with rt.sessions() as session:
        assert statuses(session) == ["succeeded", "unknown"]
        assert ledger_tokens(session) == emulator.bill()["total_tokens"]


def test_length_rejection_is_narrowed_to_the_offending_document(make_runtime, emulator):
    rt = make_runtime(chunk_max_tokens=60, chunk_overlap_tokens=0)
    emulator.configure(token_factor=200.0)  # every text now looks too long to the provider...
    ingest_events(rt, [{"op": "upsert", "doc_id": "long", "text": "word " * 50}])
    run_until(rt, lambda s: s.execute(sa.select(Document.status)).scalar_one() == "dead")
    with rt.sessions() as session:
        doc = session.execute(sa.select(Document)).scalar_one()
    assert "Range of input length" in doc.last_error


def test_account_errors_pause_everyone_and_resume_when_fixed(make_runtime, emulator):
    rt = make_runtime(account_pause_s=0.3)
    emulator.configure(api_keys=["sk-other"])  # our key is now wrong: 401 InvalidApiKey
    ingest_events(rt, events(4))
    pipeline.run_cycle(rt)
    with rt.sessions() as session:
        pause = pauses.active(session)
        assert pause is not None and "invalid_api_key" in pause.reason
        assert reports.status(session, rt.settings)["documents"]["pending"] == 4  # nothing lost
    assert pipeline.run_cycle(rt).paused  # no process calls the provider while paused
    emulator.configure(api_keys=[emulator.api_key])
    time.sleep(0.35)
    run_until(rt, all_indexed)
    with rt.sessions() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(pauses.ProviderPause)).scalar_one() == 0
        assert statuses(session)[-1] == "succeeded"


def test_reconciler_repairs_drift_without_paying_again(make_runtime, emulator):
    from worker import reconciler

    rt = make_runtime()
    ingest_events(rt, events(3))
    run_until(rt, all_indexed)
    paid = emulator.bill()["total_tokens"]
    rt.store.client.delete(
        "documents", points_selector=[p.id for p in rt.store.document_points("documents", "default", "d1")]
    )
    rt.store.write_document("documents", "default", "ghost", 1, [], meta={}, model="m", dimensions=1024)
    report = reconciler.reconcile(rt)
    assert report.redriven == 1
    run_until(rt, all_indexed)
    assert len(rt.store.document_points("documents", "default", "d1")) == 1
    assert emulator.bill()["total_tokens"] == paid  # the cache paid for the repair


def test_abandoned_sent_rows_are_closed_with_their_estimate(make_runtime):
    from worker.ledger import calls

    rt = make_runtime()
    with rt.sessions.begin() as session:
        calls.open_request(
            session,
            request_id="r1",
            model="text-embedding-v4",
            dimensions=1024,
            api="compatible",
            rows=1,
            est_tokens=1000,
            items=[],
            attempt=1,
            key_fingerprint=None,
            worker="w",
        )
    with rt.sessions.begin() as session:
        assert calls.close_abandoned(session, older_than=utcnow()) == 1
    with rt.sessions() as session:
        row = session.get(ProviderRequest, "r1")
    assert (row.status, row.billed_tokens, row.cost_nano_cny) == ("unknown", 1000, 500_000)


def test_the_ledger_reconciles_with_the_bill_including_unknown_outcomes(make_runtime, emulator):
    """A timed-out call (billed, id unknown) and a call cut off before it was sent (not billed):
    after reconciliation every bill entry is in the ledger once and the tokens are equal."""
    from tests.test_state_machine import SimulatedCrash
    from worker.ledger import billing, calls

    rt = make_runtime(request_timeout_s=0.3)
    ingest_events(rt, events(3))

    rt.faults.arm("before_call", SimulatedCrash("before_call"))
    with pytest.raises(SimulatedCrash):
        pipeline.run_cycle(rt)
    rt.faults.disarm()
    with rt.sessions.begin() as session:
        calls.close_abandoned(session, older_than=utcnow())  # as the reconciler would, later
        session.execute(sa.update(Document).values(lease_until=None))
    emulator.configure(hang_rate=1.0, hang_s=0.8)
    pipeline.run_cycle(rt)
    emulator.configure(hang_rate=0.0)
    run_until(rt, all_indexed)
    time.sleep(1.0)  # the hung call is charged when the emulator answers it
    bill = emulator.bill()["requests"]
    with rt.sessions.begin() as session:
        report = billing.reconcile(session, bill)
        assert not report.balanced and len(report.missing_from_ledger) == 0
        assert len(report.matched_by_estimate) == 1 and len(report.unknown_not_billed) == 1
        billing.reconcile(session, bill, apply=True)
    with rt.sessions.begin() as session:
        again = billing.reconcile(session, bill)
        ids = set(session.execute(sa.select(ProviderRequest.provider_request_id)).scalars())
        assert again.balanced and again.matched_by_id == len(bill)
        assert {b["request_id"] for b in bill} <= ids
        assert ledger_tokens(session) == sum(b["tokens"] for b in bill)
