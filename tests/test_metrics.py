"""/metrics without ledger scans: the roll-ups the database keeps beside the ledger equal a scan of
the ledger after every kind of write (the pipeline's, the reconciler's, `sidecar bill --apply`'s,
a delete), on SQLite and PostgreSQL, and so does the spend they give for a budget window;
migration 0009 fills them from the rows already there; the exposition follows Prometheus
conventions (`promtool check metrics`)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid

import sqlalchemy as sa

from api import metrics
from tests.fixtures.services import missing_service
from worker.embedding.base import EmbedResult
from worker.errors import CallInfo
from worker.ledger import budget, calls, rollups, spent
from worker.ledger.counters import hour_bucket
from worker.settings import Settings
from worker.sql import engines, pauses, schema
from worker.sql.models import ProviderRequest, utcnow
from worker.sql.rollup_models import RequestDelta, RequestTotal

V3, V4 = "text-embedding-v3", "text-embedding-v4"


def scanned_totals(session) -> dict[str, rollups.ModelTotals]:
    """The reference: the same figures from a full scan of the ledger."""
    out: dict[str, rollups.ModelTotals] = {}
    for r in session.execute(sa.select(ProviderRequest)).scalars():
        t = out.setdefault(r.model, rollups.ModelTotals())
        t.requests[(r.lane, r.status)] = t.requests.get((r.lane, r.status), 0) + 1
        t.rows_embedded += r.rows if r.status == "succeeded" else 0
        t.billed_tokens += r.billed_tokens or 0
        t.cost_nano_cny += r.cost_nano_cny or 0
        t.throttled += r.http_status == 429
        if r.latency_ms is not None:
            le = next((f"{b:g}" for b in rollups.LATENCY_BUCKETS_S if r.latency_ms <= b * 1000), "+Inf")
            t.latency_buckets[le] = t.latency_buckets.get(le, 0) + 1
            t.latency_count += 1
            t.latency_ms_sum += r.latency_ms
    return dict(sorted(out.items()))


def comparable(totals: dict[str, rollups.ModelTotals]) -> dict[str, tuple]:
    return {
        model: (
            {k: n for k, n in t.requests.items() if n},
            t.rows_embedded,
            t.billed_tokens,
            t.cost_nano_cny,
            t.throttled,
            t.cumulative_latency(),
            t.latency_count,
            round(t.latency_ms_sum, 3),
        )
        for model, t in totals.items()
    }


def scanned_hours(session) -> dict[tuple[str, str, str, str], tuple[int, ...]]:
    out: dict[tuple[str, str, str, str], tuple[int, ...]] = {}
    for r in session.execute(sa.select(ProviderRequest)).scalars():
        key = (hour_bucket(r.created_at), r.model, r.lane, r.status)
        add = (1, r.rows, r.est_tokens, r.billed_tokens or 0, r.cost_nano_cny or 0)
        out[key] = tuple(a + b for a, b in zip(out.get(key, (0,) * 5), add, strict=True))
    return out


def rolled_up_hours(session) -> dict[tuple[str, str, str, str], tuple[int, ...]]:
    return {tuple(r[:4]): tuple(r[4:]) for r in rollups.hourly(session)}


def assert_rollup_matches(sessions) -> None:
    with sessions.begin() as s:
        assert comparable(rollups.request_totals(s)) == comparable(scanned_totals(s))
        assert rolled_up_hours(s) == scanned_hours(s)
        statuses = dict(
            s.execute(
                sa.select(ProviderRequest.status, sa.func.count()).group_by(ProviderRequest.status)
            ).all()
        )
        assert rollups.requests_by_status(s) == statuses
        now = utcnow()
        for period in ("day", "month"):
            start, end = budget.window(period, now)
            assert rollups.spent_overall(s, start, end) == spent.spent_overall(s, start, end)
        start = now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
        assert rollups.spent_overall(s, start, start + dt.timedelta(hours=1)) == spent.spent_overall(
            s, start, start + dt.timedelta(hours=1)
        )


def open_call(s, *, model: str = V4, lane: str = "realtime", rows: int = 10, est: int = 100) -> str:
    request_id = str(uuid.uuid4())
    calls.open_request(
        s,
        request_id=request_id,
        model=model,
        dimensions=1024,
        api="compatible",
        rows=rows,
        est_tokens=est,
        items=[],
        attempt=1,
        key_fingerprint=None,
        worker="w1",
        lane=lane,
        collection="docs" if lane == "query" else None,
    )
    return request_id


def success(s, request_id: str, *, tokens: int, latency_ms: float) -> None:
    result = EmbedResult(
        vectors=[], billed_tokens=tokens, request_id=f"p-{request_id}", latency_ms=latency_ms
    )
    calls.record_success(s, request_id, result, cost_nano_cny=tokens * 500)


def test_rollup_equals_a_ledger_scan_after_every_kind_of_write(database_url):
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    sessions = engines.make_sessionmaker(engine)
    try:
        with sessions.begin() as s:
            ok = [open_call(s, rows=10, est=90 + i) for i in range(5)]
            query = open_call(s, lane="query", rows=1, est=7)
            old = [open_call(s, model=V3, rows=3, est=30) for _ in range(3)]
        assert_rollup_matches(sessions)  # every row `sent`: in flight
        with sessions.begin() as s:
            for i, request_id in enumerate(ok[:4]):
                success(s, request_id, tokens=95 + i, latency_ms=(30.0, 50.0, 220.0, 75_000.0)[i])
            success(s, query, tokens=7, latency_ms=12.5)
            calls.record_failure(s, ok[4], CallInfo(http_status=429, latency_ms=3.0), message="throttled")
            calls.record_failure(
                s, old[0], CallInfo(http_status=None), message="read timeout", unknown_cost_nano=30 * 700
            )
        assert_rollup_matches(sessions)
        with sessions.begin() as s:  # the reconciler closes calls whose worker died
            s.execute(sa.update(ProviderRequest).values(created_at=utcnow() - dt.timedelta(hours=1)))
            assert calls.close_abandoned(s, older_than=utcnow()) == 2
        assert_rollup_matches(sessions)
        with sessions.begin() as s:  # `sidecar bill --apply` rewrites unknown rows with the bill
            row = s.get(ProviderRequest, old[1])
            row.billed_tokens, row.cost_nano_cny, row.error_message = 28, 28 * 700, "[billed]"
            row = s.get(ProviderRequest, old[2])
            row.status = "succeeded"  # a late success after the reconciler gave up on it
            row.latency_ms = 1_500.0
        assert_rollup_matches(sessions)
        with sessions.begin() as s:
            s.execute(sa.delete(ProviderRequest).where(ProviderRequest.id == ok[0]))
        assert_rollup_matches(sessions)
        with sessions.begin() as s:  # PostgreSQL: the deltas move into the roll-ups
            folded = rollups.fold(s)
            assert (folded > 0) == (engine.dialect.name == "postgresql")
            assert rollups.fold(s) == 0
        assert_rollup_matches(sessions)
        with sessions.begin() as s:
            success(s, old[1], tokens=1, latency_ms=5.0)  # after a fold, deltas again
        assert_rollup_matches(sessions)
        with sessions.begin() as s:
            v4 = rollups.request_totals(s)[V4]
        assert v4.requests == {
            ("realtime", "succeeded"): 3,
            ("realtime", "failed"): 1,
            ("query", "succeeded"): 1,
        }
        assert v4.throttled == 1 and v4.rows_embedded == 31 and v4.latency_count == 5
        assert v4.cumulative_latency()[:2] == [("0.05", 3), ("0.1", 3)]
        assert v4.cumulative_latency()[-2:] == [("60", 4), ("+Inf", 5)]
    finally:
        engine.dispose()


def test_migration_fills_the_rollup_from_existing_rows(database_url):
    schema.upgrade(database_url, "0008")
    engine = engines.make_engine(database_url)
    sessions = engines.make_sessionmaker(engine)
    try:
        with sessions.begin() as s:
            ids = [open_call(s, rows=5, est=50) for _ in range(4)]
            success(s, ids[0], tokens=51, latency_ms=80.0)
            calls.record_failure(s, ids[1], CallInfo(http_status=500, latency_ms=9.0), message="boom")
        schema.upgrade(database_url)
        assert_rollup_matches(sessions)
        with sessions.begin() as s:
            success(s, ids[2], tokens=49, latency_ms=400.0)  # the triggers take over from here
        assert_rollup_matches(sessions)
        schema.downgrade(database_url, "0008")
        assert "provider_request_totals" not in sa.inspect(engine).get_table_names()
        with sessions.begin() as s:  # the ledger works without the triggers' table
            success(s, ids[3], tokens=50, latency_ms=1.0)
    finally:
        engine.dispose()


def exposition(database_url: str, settings: Settings) -> str:
    engine = engines.make_engine(database_url)
    try:
        with engines.make_sessionmaker(engine).begin() as s:
            return metrics.render(s, settings)
    finally:
        engine.dispose()


def test_metrics_read_the_rollup_and_name_families_by_convention(sqlite_url, tmp_path):
    schema.upgrade(sqlite_url)
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, budget_daily_cny="1")
    engine = engines.make_engine(sqlite_url)
    sessions = engines.make_sessionmaker(engine)
    with sessions.begin() as s:
        done, _flying = open_call(s, rows=4), open_call(s, lane="batch")
        success(s, done, tokens=40, latency_ms=70.0)
        pauses.pause(s, "provider account error: arrears", for_s=60)
        # The rows the scrape reads are the roll-up's, not the ledger's: edit the roll-up alone.
        s.execute(sa.update(RequestTotal).where(RequestTotal.status == "succeeded").values(rows=9))
    engine.dispose()
    text = exposition(sqlite_url, settings)
    lines = set(text.splitlines())
    for expected in (
        f'sidecar_provider_requests_total{{model="{V4}",lane="realtime",status="succeeded"}} 1',
        f'sidecar_provider_requests_in_flight{{model="{V4}",lane="batch"}} 1',
        f'sidecar_provider_requests_in_flight{{model="{V4}",lane="realtime"}} 0',
        f'sidecar_rows_embedded_total{{model="{V4}"}} 9',
        f'sidecar_provider_latency_seconds_bucket{{model="{V4}",le="0.05"}} 0',
        f'sidecar_provider_latency_seconds_bucket{{model="{V4}",le="0.1"}} 1',
        f'sidecar_provider_latency_seconds_sum{{model="{V4}"}} 0.07',
        "sidecar_provider_paused 1",
        'sidecar_budget_limit_cny{collection="*",period="day"} 1.000000000',
    ):
        assert expected in lines, expected
    assert not any(line.startswith("sidecar_requests_total") for line in lines)  # renamed (README note)
    for line in lines:
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_service("promtool (apt package prometheus)", FileNotFoundError("promtool"))
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_scrape_folds_the_pending_deltas(database_url, tmp_path):
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    sessions = engines.make_sessionmaker(engine)
    try:
        with sessions.begin() as s:
            done = open_call(s, rows=4)
            success(s, done, tokens=40, latency_ms=70.0)
        with sessions() as s:  # as the API's session: no transaction of its own around the scrape
            text = metrics.render(s, Settings(_env_file=None, data_dir=tmp_path, database_url=database_url))
        assert f'sidecar_rows_embedded_total{{model="{V4}"}} 4' in text.splitlines()
        with sessions() as s:
            assert s.execute(sa.select(sa.func.count()).select_from(RequestDelta)).scalar_one() == 0
        assert_rollup_matches(sessions)
    finally:
        engine.dispose()
