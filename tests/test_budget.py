"""Spend caps: admission arithmetic on SQL, pause and resume through the API, and in the pipeline."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
import sqlalchemy as sa

from tests.test_api import READ, add_document, add_request, at, broker, start_api  # noqa: F401 (fixture)
from worker import pipeline
from worker.ledger import budget, reports
from worker.settings import Settings
from worker.sql import engines, schema
from worker.sql.models import Document, ProviderRequest
from worker.tasks import ingest_events

NOW = at("2026-11-21T15:30:00")
NONE = Settings(_env_file=None)


@pytest.fixture()
def sessions(database_url):
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    yield engines.make_sessionmaker(engine)
    engine.dispose()


def test_money_windows_and_settings_parsing():
    assert [budget.money(n) for n in (10**9, 999_900_000, 200_000, 0)] == ["1.00", "0.9999", "0.0002", "0.00"]
    assert budget.window("month", at("2026-12-31T23:59:59")) == (
        at("2026-12-01T00:00:00"),
        at("2027-01-01T00:00:00"),
    )
    s = Settings(
        _env_file=None,
        budget_collection_daily_cny="docs=1.5, faq=0.2",
        budget_collection_monthly_cny='{"docs": "30"}',
    )
    assert s.budget_collection_daily_cny == {"docs": budget.Decimal("1.5"), "faq": budget.Decimal("0.2")}
    assert s.budget_collection_monthly_cny == {"docs": budget.Decimal("30")}
    with pytest.raises(ValueError):
        Settings(_env_file=None, budget_collection_daily_cny="docs")
    with pytest.raises(ValueError):
        budget.parse_cny("-1")


def test_admit_counts_billed_and_in_flight_spend_per_window(sessions):
    caps = Settings(
        _env_file=None,
        budget_daily_cny="0.0001",
        budget_monthly_cny="0.001",
        budget_collection_daily_cny="faq=0.00002",
    )
    with sessions.begin() as s:
        d, f = add_document(s, "d"), add_document(s, "f", collection="faq")
        # today: 60 000 billed + a `sent` request of 20 tokens at 500 = 10 000 → 70 000 nano
        add_request(s, "a", NOW - dt.timedelta(hours=1), items=[(d, 90), (f, 30)], billed=120, cost=60_000)
        add_request(s, "b", NOW - dt.timedelta(minutes=1), items=[(d, 20)], status="sent")
        add_request(s, "c", NOW - dt.timedelta(minutes=2), items=[(d, 50)], status="failed", billed=0, cost=0)
        # yesterday: counts for the month only
        add_request(s, "y", NOW - dt.timedelta(days=1), items=[(d, 1000)], billed=1000, cost=500_000)
    with sessions() as s:
        assert budget.spent_overall(s, *budget.window("day", NOW)) == 70_000
        # faq's share of request a: 60 000 × 30 / 120
        assert budget.spent_by_collection(s, *budget.window("day", NOW), {"faq", "docs"}) == {
            "faq": 15_000,
            "docs": 55_000,
        }
        budget.admit(
            s, collections={"docs"}, est_cost_nano=30_000, now=NOW, settings=caps
        )  # exactly at the cap
        with pytest.raises(budget.BudgetExceeded) as exc:
            budget.admit(s, collections={"docs"}, est_cost_nano=30_001, now=NOW, settings=caps)
        assert str(exc.value) == (
            "daily cap of CNY 0.0001 for all collections reached: spent 0.00007, this "
            "request ~0.000030001; resumes at 2026-11-22T00:00Z or when the cap is raised"
        )
        assert exc.value.retry_after_s == budget.RECHECK_S and exc.value.resumes_at == at(
            "2026-11-22T00:00:00"
        )
        with pytest.raises(budget.BudgetExceeded, match="collection 'faq'"):
            budget.admit(s, collections={"faq", "docs"}, est_cost_nano=5_001, now=NOW, settings=caps)
        budget.admit(
            s, collections={"docs"}, est_cost_nano=5_001, now=NOW + dt.timedelta(days=1), settings=caps
        )
        with pytest.raises(budget.BudgetExceeded, match=r"monthly cap .* resumes at 2026-12-01T00:00Z"):
            budget.admit(
                s, collections={"docs"}, est_cost_nano=430_001, now=NOW + dt.timedelta(days=1), settings=caps
            )
        budget.admit(
            s, collections={"docs"}, est_cost_nano=10**9, now=NOW, settings=NONE
        )  # no caps, no limit


def test_caps_set_in_sql_override_the_settings(sessions):
    caps = Settings(_env_file=None, budget_daily_cny="0.00001")
    with sessions.begin() as s:
        add_request(s, "a", NOW, items=[(add_document(s, "d"), 20)], billed=20, cost=10_000)
    with sessions.begin() as s:
        assert budget.budget_state(s, now=NOW, settings=caps)["paused"] is True
        budget.set_cap(s, collection=None, period="day", limit_nano=None)  # no cap, whatever the settings say
        assert budget.effective_caps(s, caps) == []
        budget.admit(s, collections={"docs"}, est_cost_nano=10**6, now=NOW, settings=caps)
        budget.set_cap(s, collection="docs", period="month", limit_nano=15_000)
        state = budget.budget_state(s, now=NOW, settings=caps)
        assert (state["paused"], state["paused_collections"]) == (False, [])
        assert [
            (c["collection"], c["period"], c["source"], c["spent_cny"], c["remaining_cny"])
            for c in state["caps"]
        ] == [("docs", "month", "api", "0.000010000", "0.000005000")]
        budget.clear_cap(s, collection=None, period="day")
        assert budget.budget_state(s, now=NOW, settings=caps)["paused"] is True


def test_budget_through_the_api_pauses_and_resumes(database_url, broker, tmp_path):  # noqa: F811
    running, api = start_api(database_url, broker, tmp_path)
    try:
        now = dt.datetime.now(dt.UTC)
        with api.sessions.begin() as s:
            add_request(s, "a", now, items=[(add_document(s, "d"), 40)], billed=40, cost=20_000)
            waiting = add_document(s, "w", status="pending")
            s.execute(
                sa.update(Document)
                .where(Document.id == waiting)
                .values(last_error="BudgetExceeded: daily cap…", lease_until=now + dt.timedelta(seconds=60))
            )
        with api.client() as w, api.client(READ) as r:
            state = w.put("/v1/budget/caps", json={"period": "day", "limit_cny": "0.00002"}).json()
            assert state["paused"] is True and state["waiting_documents"] == 1
            assert "daily cap of CNY 0.00002 for all collections reached" in state["reasons"][0]
            assert httpx.get(f"{api.url}/readyz").status_code == 503
            assert w.put("/v1/budget/caps", json={"period": "day", "limit_cny": "1e5"}).status_code == 422
            assert w.put("/v1/budget/caps", json={"period": "week", "limit_cny": "1"}).status_code == 422
            with api.sessions.begin() as s:  # the worker leased it again meanwhile
                s.execute(
                    sa.update(Document)
                    .where(Document.id == waiting)
                    .values(lease_until=now + dt.timedelta(seconds=60))
                )
            state = w.put("/v1/budget/caps", json={"period": "day", "limit_cny": "0.5"}).json()
            assert state["paused"] is False
            assert httpx.get(f"{api.url}/readyz").status_code == 200
            with api.sessions() as s:  # raising the cap freed the waiting document at once
                assert s.get(Document, waiting).lease_until is None
            caps = r.get("/v1/budget").json()["caps"]
            assert [(c["limit_cny"], c["spent_cny"], c["source"]) for c in caps] == [
                ("0.500000000", "0.000020000", "api")
            ]
            assert w.request("DELETE", "/v1/budget/caps", params={"period": "day"}).json()["caps"] == []
        with api.sessions() as s:
            assert reports.status(s, NONE)["budget"]["paused"] is False
    finally:
        running.stop()
        api.engine.dispose()


def test_pipeline_stops_at_the_cap_and_resumes_when_raised(make_runtime, emulator):
    rt = make_runtime()
    rt.budget_check = budget.pipeline_check(rt.spec, NONE)  # caps from the API only
    texts = [f"document number {i} about green tea and how it is grown" for i in range(25)]
    ingest_events(rt, [{"op": "upsert", "doc_id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    with rt.sessions.begin() as s:  # room for about one request of ten rows
        budget.set_cap(s, collection=None, period="day", limit_nano=70_000)
    for _ in range(5):
        pipeline.run_cycle(rt)
    with rt.sessions() as s:
        rows = s.execute(sa.select(ProviderRequest)).scalars().all()
        spent = sum(r.cost_nano_cny or 0 for r in rows)
        pending = s.execute(sa.select(sa.func.count()).where(Document.status == "pending")).scalar_one()
    assert 1 <= len(rows) < 3 and spent <= 70_000  # estimate ≥ bill for this emulator
    assert pending > 0 and len(emulator.bill()["requests"]) == len(rows)
    with rt.sessions.begin() as s:
        budget.set_cap(s, collection=None, period="day", limit_nano=None)
    for _ in range(10):
        if pipeline.run_cycle(rt).idle:
            break
    with rt.sessions() as s:
        assert s.execute(sa.select(sa.func.count()).where(Document.status == "pending")).scalar_one() == 0


def test_a_query_counts_in_full_towards_the_collection_it_names(sessions):
    with sessions.begin() as s:
        d = add_document(s, "d")
        add_request(s, "doc", NOW - dt.timedelta(hours=1), items=[(d, 40)], billed=40, cost=20_000)
        add_request(s, "q", NOW - dt.timedelta(minutes=5), items=[], billed=8, cost=4_000, est_tokens=8)
        s.get(ProviderRequest, "q").collection = "docs"  # a search query: no items, one collection
    with sessions() as s:
        window = budget.window("day", NOW)
        assert budget.spent_by_collection(s, *window, {"docs", "faq"}) == {"docs": 24_000, "faq": 0}
        assert budget.spent_overall(s, *window) == 24_000
