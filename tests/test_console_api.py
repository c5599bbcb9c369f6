"""The console's server side over real HTTP (no browser): sign-in and its cookie, the cookie standing
in for the bearer header, CSRF on writes, the pages' headers, and the two routes the console adds
(GET /v1/status, GET /v1/activity) on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import sqlalchemy as sa

from api.console.session import COOKIE, cookie_value, csrf_for, token_of
from tests.test_api import READ, WRITE, Api, add_document, add_request, start_api
from worker.ledger import counters, reports
from worker.sql import backlog_models, retention
from worker.sql.backlog_models import BacklogSample
from worker.sql.models import Document, utcnow


@pytest.fixture()
def api(database_url, redis_url, tmp_path) -> Iterator[Api]:
    """The API on SQLite or PostgreSQL (its Celery app is built but these tests publish nothing)."""
    running, handle = start_api(database_url, SimpleNamespace(url=redis_url), tmp_path)
    yield handle
    running.stop()
    handle.engine.dispose()


def signed_in(api, token: str) -> tuple[httpx.Client, str]:
    """A client without a bearer header, holding the console cookie; and the session's CSRF value."""
    c = httpx.Client(base_url=api.url, timeout=10)
    answer = c.post("/console/session", json={"token": token})
    assert answer.status_code == 200, answer.text
    return c, answer.json()["csrf"]


def test_sign_in_sets_an_http_only_strict_cookie(api):
    with httpx.Client(base_url=api.url, timeout=10) as c:
        page = c.get("/console")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert c.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/console/static/../app.py").status_code == 404
        assert c.get("/console/static/secret.txt").status_code == 404
        assert c.get("/console/session").status_code == 401
        assert c.post("/console/session", json={"token": "wrong"}).status_code == 401
        assert c.post("/console/session", json={"token": ""}).status_code == 422
        assert c.post("/console/session", json={"token": {"$ne": 1}}).status_code == 422
        # a cross-site form can send only form encodings: never a session
        form = c.post(
            "/console/session", content=json.dumps({"token": READ}), headers={"content-type": "text/plain"}
        )
        assert form.status_code in (415, 422) and COOKIE not in c.cookies
        answer = c.post("/console/session", json={"token": READ})
        assert answer.json() == {"role": "read", "csrf": csrf_for(READ)}
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert READ not in cookie  # encoded, never the raw token in a header a proxy may log whole
        assert c.get("/console/session").json()["role"] == "read"
        assert c.delete("/console/session").status_code == 204
        assert c.get("/console/session").status_code == 401


def test_the_cookie_reads_and_writes_need_csrf(api):
    with api.sessions() as s:
        dead = add_document(s, "gone", status="dead")
        s.commit()
    reader, read_csrf = signed_in(api, READ)
    writer, csrf = signed_in(api, WRITE)
    assert reader.get("/v1/deadletters").json()["items"][0]["id"] == dead
    assert reader.get("/metrics").status_code == 200
    assert httpx.get(f"{api.url}/v1/deadletters").status_code == 401  # no cookie, no header
    # a read token's cookie cannot write, CSRF or not
    assert (
        reader.post(f"/v1/deadletters/{dead}/retry", headers={"x-csrf-token": read_csrf}).status_code == 403
    )
    # a write token's cookie needs its session's CSRF value and, when named, this origin
    assert writer.post(f"/v1/deadletters/{dead}/retry").status_code == 403
    assert (
        writer.post(f"/v1/deadletters/{dead}/retry", headers={"x-csrf-token": read_csrf}).status_code == 403
    )
    foreign = {"x-csrf-token": csrf, "origin": "https://evil.example"}
    assert writer.post(f"/v1/deadletters/{dead}/retry", headers=foreign).status_code == 403
    same = {"x-csrf-token": csrf, "origin": api.url}
    assert writer.post(f"/v1/deadletters/{dead}/retry", headers=same).json() == {"retried": 1}
    # an Authorization header wins over the cookie: a read bearer stays a reader
    assert (
        writer.post(
            f"/v1/deadletters/{dead}/retry", headers={"Authorization": f"Bearer {READ}", "x-csrf-token": csrf}
        ).status_code
        == 403
    )
    # a cookie that is not ours is no session
    junk = httpx.Client(base_url=api.url, cookies={COOKIE: "%%%not-base64"}, timeout=10)
    assert junk.get("/v1/deadletters").status_code == 401
    for client in (reader, writer, junk):
        client.close()


def test_cookie_values_round_trip_any_token():
    for token in ("plain", "with,comma;semi colon", "lätin-1-tøken", "=" * 9):
        assert token_of(f"other=1; {COOKIE}={cookie_value(token)}") == token
    # what no bearer header could carry is no session either
    for unusable in ("令牌", "tab\there"):
        assert token_of(COOKIE + "=" + cookie_value(unusable)) is None
    assert token_of("") is None and token_of(f"{COOKIE}=") is None and token_of(f"{COOKIE}=AA") is None


def test_status_route_is_what_the_cli_prints(api):
    with api.sessions() as s:
        doc = add_document(s, "a", status="pending")
        add_request(s, "r1", utcnow() - dt.timedelta(minutes=3), items=[(doc, 5)], billed=5, cost=2500)
        s.commit()
        expected = reports.status(s, api_settings(api))
    with api.client(READ) as c:
        answer = c.get("/v1/status").json()
    answer.pop("oldest_pending_age_s"), expected.pop("oldest_pending_age_s")
    assert answer == json.loads(json.dumps(expected))


def api_settings(api):
    from worker.settings import Settings

    return Settings(_env_file=None, database_url=api.database_url, api_tokens=WRITE, api_read_tokens=READ)


def test_activity_counts_the_last_hour_by_minute(api):
    now = utcnow()
    with api.sessions() as s:
        doc = add_document(s, "a")
        add_document(s, "p1", status="pending")
        add_document(s, "p2", status="pending")
        add_document(s, "d", status="dead")
        add_request(s, "r1", now - dt.timedelta(minutes=2), items=[(doc, 5)], billed=5, cost=2500)
        add_request(s, "r2", now - dt.timedelta(minutes=2), items=[(doc, 7)], billed=7, cost=3500)
        add_request(s, "r3", now - dt.timedelta(minutes=90), items=[(doc, 9)], billed=9, cost=4500)
        s.execute(
            sa.update(Document)
            .where(Document.doc_id == "p1")
            .values(updated_at=now - dt.timedelta(seconds=30))
        )
        counters.record_outcomes(s, {"accepted": 4, "stale": 1}, now=now)
        s.commit()
    with api.client(READ) as c:
        answer = c.get("/v1/activity").json()
        assert c.get("/v1/activity", params={"minutes": 0}).status_code == 422
        assert c.get("/v1/activity", params={"minutes": "x"}).status_code == 422
        assert len(c.get("/v1/activity", params={"minutes": 5}).json()["series"]) == 5
    assert answer["backlog"]["pending"] == 2 and answer["backlog"]["dead"] == 1
    assert answer["backlog"]["oldest_pending_age_s"] >= 30
    series = answer["series"]
    assert len(series) == 60 and series[-1]["minute"] == now.strftime("%Y-%m-%dT%H:%MZ")
    two_ago = (now - dt.timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%MZ")
    busy = [m for m in series if m["requests"]]
    assert [m["minute"] for m in busy] == [two_ago]  # r3 is older than the hour
    assert busy[0]["tokens"] == 12 and busy[0]["requests"] == 2
    assert answer["last_5_min"]["tokens_per_min"] == 2.4
    assert answer["events_accepted_by_hour"][-1] | {"hour": None} == {"hour": None, "accepted": 4, "stale": 1}
    with api.client(None) as anonymous:
        assert anonymous.get("/v1/activity").status_code == 401
        assert anonymous.get("/v1/status").status_code == 401


def test_backlog_is_sampled_once_a_minute_and_served_per_minute(api):
    now = utcnow()
    with api.sessions.begin() as s:
        add_document(s, "p1", status="pending")
        add_document(s, "p2", status="pending")
        add_document(s, "d", status="dead")
    with api.sessions.begin() as s:
        assert backlog_models.record_sample(s, now - dt.timedelta(minutes=3))
        assert backlog_models.record_sample(s, now)
        assert backlog_models.record_sample(s, now - dt.timedelta(days=8))
    with api.sessions.begin() as s:
        add_document(s, "p3", status="pending")
        assert not backlog_models.record_sample(s, now)  # this minute has its row: the first stays
    with api.client(READ) as c:
        answer = c.get("/v1/activity").json()
        short = c.get("/v1/activity", params={"minutes": 2}).json()["backlog_series"]
    series = answer["backlog_series"]
    assert len(series) == 60 and [m["minute"] for m in series] == [m["minute"] for m in answer["series"]]
    sampled = [m for m in series if m["pending"] is not None]
    three_ago = (now - dt.timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%MZ")
    assert [m["minute"] for m in sampled] == [three_ago, now.strftime("%Y-%m-%dT%H:%MZ")]
    assert all(m["pending"] == 2 and m["dead"] == 1 for m in sampled)
    assert all(m["oldest_pending_age_s"] >= 0 for m in sampled)
    assert series[0] == {"minute": series[0]["minute"]} | dict.fromkeys(
        ("pending", "dead", "oldest_pending_age_s")
    )
    assert len(short) == 2 and short[-1]["pending"] == 2
    with api.sessions.begin() as s:
        assert retention.prune(s, api_settings(api), now)["backlog_samples"] == 1  # the 8-day-old one
    with api.sessions() as s:
        assert s.execute(sa.select(sa.func.count()).select_from(BacklogSample)).scalar_one() == 2


def test_the_embedding_loop_samples_the_backlog_once_a_minute(make_runtime):
    import time

    from worker.service import EmbedService

    rt = make_runtime(poll_interval_s=0.05)
    service = EmbedService(rt, threads=2, reconcile=False)
    service.start()
    try:
        deadline = time.monotonic() + 10
        rows: list[BacklogSample] = []
        while not rows and time.monotonic() < deadline:
            time.sleep(0.1)
            with rt.sessions() as s:
                rows = list(s.execute(sa.select(BacklogSample)).scalars())
        time.sleep(0.5)  # many more cycles of both threads: still one row per minute
        with rt.sessions() as s:
            rows = list(s.execute(sa.select(BacklogSample)).scalars())
    finally:
        service.stop()
    assert 1 <= len(rows) <= 2  # 2 only if a minute ended meanwhile
    assert rows[0].pending == 0 and rows[0].dead == 0 and rows[0].minute.second == 0
