"""The HTTP API over real HTTP: uvicorn on loopback, an httpx client, SQLite and PostgreSQL, Redis broker."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from api.app import create_app
from worker.events import parse_event
from worker.ledger import counters
from worker.settings import Settings
from worker.sql import documents, engines, schema
from worker.sql.models import Document, ProviderRequest, RequestItem

WRITE, READ = "w-token-1", "r-token-1"
UTC = dt.UTC


class RunningApi:
    def __init__(self, app, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=1).raise_for_status()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise RuntimeError("the API did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


class Api:
    """A started API and the SQL behind it."""

    def __init__(self, url: str, database_url: str, broker) -> None:
        self.url, self.database_url, self.broker = url, database_url, broker
        self.engine = engines.make_engine(database_url)
        self.sessions = engines.make_sessionmaker(self.engine)

    def client(self, token: str | None = WRITE) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def queued(self) -> list:
        """Arguments of the messages waiting in the broker's `celery` queue, oldest first."""
        out = []
        for raw in reversed(self.broker.lrange("celery", 0, -1)):  # kombu LPUSHes, workers BRPOP
            body = json.loads(base64.b64decode(json.loads(raw)["body"]))
            out.append(body[0])
        return out


@pytest.fixture()
def broker(redis_url) -> Iterator:
    import redis

    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/13")
    client.flushdb()
    client.url = redis_url.rsplit("/", 1)[0] + "/13"
    yield client
    client.flushdb()
    client.close()


def start_api(database_url: str, broker, tmp_path, **overrides) -> tuple[RunningApi, Api]:
    schema.upgrade(database_url)
    values = {
        "data_dir": tmp_path,
        "database_url": database_url,
        "broker_url": broker.url,
        "max_text_bytes": 4096,
        "api_tokens": f"{WRITE},w-token-2",
        "api_read_tokens": READ,
        "api_max_body_bytes": 64 << 10,
        "api_max_events": 50,
    }
    settings = Settings(_env_file=None, **{**values, **overrides})
    running = RunningApi(create_app(settings))
    return running, Api(running.url, database_url, broker)


@pytest.fixture()
def api(database_url, broker, tmp_path) -> Iterator[Api]:
    running, handle = start_api(database_url, broker, tmp_path)
    yield handle
    running.stop()
    handle.engine.dispose()


# --- ledger rows written by hand, so expected figures can be computed by hand --------------------


def add_document(
    session, doc_id: str, *, collection: str = "docs", tenant: str = "default", status: str = "indexed"
) -> int:
    doc = Document(
        tenant=tenant,
        collection=collection,
        doc_id=doc_id,
        version=1,
        op="upsert",
        text="x",
        text_hash="h" * 64,
        status=status,
        attempts=0,
    )
    session.add(doc)
    session.flush()
    return doc.id


def add_request(
    session,
    rid: str,
    at: dt.datetime,
    *,
    items: list[tuple[int, int]],
    status: str = "succeeded",
    model: str = "text-embedding-v4",
    billed: int | None = None,
    cost: int | None = None,
    provider_id: str | None = None,
    latency_ms: float | None = 120.0,
    http_status: int | None = 200,
    est_tokens: int | None = None,
) -> None:
    """items: (document id, est_tokens); rows = len(items)."""
    est = est_tokens if est_tokens is not None else sum(t for _, t in items)
    session.add(
        ProviderRequest(
            id=rid,
            provider_request_id=provider_id,
            status=status,
            model=model,
            dimensions=1024,
            api="compatible",
            rows=len(items),
            est_tokens=est,
            billed_tokens=billed,
            cost_nano_cny=cost,
            http_status=http_status,
            latency_ms=latency_ms,
            attempt=1,
            created_at=at,
            completed_at=None if status == "sent" else at,
        )
    )
    session.flush()
    for i, (doc, tokens) in enumerate(items):
        session.add(
            RequestItem(
                request_id=rid,
                document_id=doc,
                version=1,
                chunk_index=i,
                content_hash="c" * 64,
                est_tokens=tokens,
            )
        )
    session.flush()


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- auth ---------------------------------------------------------------------------------------

EVENT = {"op": "upsert", "doc_id": "a", "text": "hello"}


def test_tokens_read_and_write(api):
    with (
        api.client(None) as anon,
        api.client("nope") as wrong,
        api.client(READ) as reader,
        api.client(WRITE) as writer,
        api.client("w-token-2") as writer2,
    ):
        assert anon.get("/healthz").status_code == 200
        for client in (anon, wrong):
            for method, path in (
                ("GET", "/v1/spend"),
                ("GET", "/v1/requests"),
                ("GET", "/metrics"),
                ("POST", "/v1/events"),
                ("GET", "/v1/deadletters"),
            ):
                r = client.request(method, path, json=EVENT)
                assert r.status_code == 401, (method, path)
                assert r.headers["www-authenticate"] == "Bearer"
        assert wrong.get("/v1/spend", headers={"Authorization": "Basic " + READ}).status_code == 401
        assert reader.get("/v1/spend").status_code == 200
        r = reader.post("/v1/events", json=EVENT)
        assert r.status_code == 403 and "only read" in r.json()["detail"]
        assert reader.put("/v1/budget/caps", json={"period": "day", "limit_cny": "1"}).status_code == 403
        assert writer.post("/v1/events", json=EVENT).status_code == 202
        assert writer2.get("/v1/budget").status_code == 200
    assert len(api.queued()) == 1


def test_openapi_documents_the_bearer_scheme(api):
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"/v1/events", "/v1/requests", "/v1/spend", "/v1/deadletters", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )


# --- events -------------------------------------------------------------------------------------


def test_events_accepted_reach_the_broker(api):
    events = [EVENT, {"op": "delete", "doc_id": "b", "collection": "faq", "version": 3}]
    with api.client() as c:
        r = c.post("/v1/events", json=events)
        one = c.post("/v1/events", json={"op": "upsert", "doc_id": "z", "text": "t", "tenant": "acme"})
    assert r.status_code == 202
    body = r.json()
    assert body["accepted"] == 2 and body["task_id"]
    assert body["events"] == [
        {"index": 0, "doc_id": "a", "collection": "documents"},
        {"index": 1, "doc_id": "b", "collection": "faq"},
    ]
    assert one.status_code == 202 and one.json()["accepted"] == 1
    assert api.queued() == [[events], [[{"op": "upsert", "doc_id": "z", "text": "t", "tenant": "acme"}]]]


def test_invalid_events_are_named_by_index_field_and_rule(api):
    events = [
        EVENT,
        {"op": "move", "doc_id": "a"},
        {"op": "upsert", "doc_id": "b"},
        {"op": "delete", "doc_id": "c", "collection": "no spaces"},
        "text",
        {"op": "upsert", "doc_id": "d", "text": "x" * 5000},
        {"op": "upsert", "doc_id": "e", "text": "t", "x": 1},
    ]
    with api.client() as c:
        r = c.post("/v1/events", json=events)
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert [(d["index"], d["field"]) for d in detail] == [
            (1, "op"),
            (2, "text"),
            (3, "collection"),
            (4, "event"),
            (5, "text"),
            (6, "x"),
        ]
        assert detail[0]["rule"] == 'required; must be "upsert" or "delete"'
        assert detail[4]["rule"] == "5000 bytes of UTF-8 is over the cap of 4096"
        assert "unknown field" in detail[5]["rule"]

        r = c.post("/v1/events", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body"
        assert c.post("/v1/events", json=[]).status_code == 422
        assert c.post("/v1/events", json={"op": "upsert", "doc_id": "", "text": "t"}).json()["detail"] == [
            {"index": 0, "field": "doc_id", "rule": "required; a string of 1 to 512 characters"}
        ]

        big = [{"op": "upsert", "doc_id": f"d{i}", "text": "y" * 4000} for i in range(20)]
        r = c.post("/v1/events", json=big)
        assert r.status_code == 413 and "over the cap of 65536 bytes" in r.json()["detail"][0]["rule"]
        many = [{"op": "delete", "doc_id": f"d{i}"} for i in range(51)]
        assert c.post("/v1/events", json=many).status_code == 413
    assert api.queued() == []  # all or nothing


# --- hostile input ----------------------------------------------------------------------------


def raw_http(url: str, head: str, parts: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and body parts as they are (no client rules), then read the answer
    until the server closes: (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in parts:
            sock.sendall(part)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # the server closed with our bytes unread: a reset after its answer
            if b"\r\n\r\n" not in answer:
                raise
    top, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_oversized_bodies_are_refused_before_auth_and_before_reading(api):
    # 80 MiB declared, no byte of it sent, no token: 413 at once, nothing waited for or read (a
    # byte left unread would make the server's close a reset, which can lose its answer)
    status, headers, body = raw_http(
        api.url,
        f"POST /v1/events HTTP/1.1\nHost: api\nContent-Type: application/json\nContent-Length: {80 << 20}\n",
        [],
    )
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["detail"] == [
        {"index": None, "field": "body", "rule": "over the cap of 65536 bytes"}
    ]
    # chunked, no length, no token, on a route whose body FastAPI reads before auth: stopped at the cap
    chunk = b"x" * (16 << 10)
    status, _, body = raw_http(
        api.url,
        "PUT /v1/budget/caps HTTP/1.1\nHost: api\nTransfer-Encoding: chunked\n",
        [b"%x\r\n%b\r\n" % (len(chunk), chunk)] * 5,  # 80 KiB, and no closing chunk
    )
    assert status == 413 and "over the cap of 65536 bytes" in json.loads(body)["detail"][0]["rule"]
    # the same with a write token on the events route
    status, _, _ = raw_http(
        api.url,
        f"POST /v1/events HTTP/1.1\nHost: api\nAuthorization: Bearer {WRITE}\nTransfer-Encoding: chunked\n",
        [b"%x\r\n%b\r\n" % (len(chunk), chunk)] * 5,
    )
    assert status == 413
    assert api.queued() == []


def test_events_the_worker_would_refuse_are_refused_here(api):
    cases = [
        (rb'{"op":"upsert","doc_id":"\ud800","text":"x"}', "doc_id"),
        (rb'{"op":"upsert","doc_id":"a","text":"lone \udc00 surrogate"}', "text"),
        (rb'{"op":"upsert","doc_id":"a\u0000b","text":"x"}', "doc_id"),
        (rb'{"op":"upsert","doc_id":"a","text":"x\u0000"}', "text"),
        (rb'{"op":"upsert","doc_id":"a","text":"x","collection":"a\n"}', "collection"),
        (rb'{"op":"upsert","doc_id":"a","text":"x","tenant":"t\n"}', "tenant"),
        (rb'{"op":"delete","doc_id":"a","version":9223372036854775808}', "version"),
        (rb'{"op":"upsert","doc_id":"a","text":"x","metadata":{"\ud800":1}}', "metadata"),
    ]
    with api.client() as c:
        for raw, field in cases:
            r = c.post("/v1/events", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422, raw
            assert [(d["index"], d["field"]) for d in r.json()["detail"]] == [(0, field)], raw
        # an unknown field that is not valid Unicode is named, escaped, not a server error
        r = c.post("/v1/events", content=rb'{"op":"delete","doc_id":"a","\ud800":1}')
        assert r.status_code == 422 and "unknown field" in r.json()["detail"][0]["rule"]
    assert api.queued() == []


def test_bodies_that_are_not_json_get_a_reason(api):
    with api.client() as c:
        for body in (b"\xff\xfe\x00garbage", b"[" * 100_000, b"", b"op=upsert&doc_id=a", b'{"op": NaN}'):
            r = c.post("/v1/events", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, body[:20]
            assert r.json()["detail"][0]["rule"], body[:20]
    assert api.queued() == []


def test_a_broker_that_does_not_take_the_events_answers_503(database_url, broker, tmp_path):
    running, api = start_api(database_url, broker, tmp_path, broker_url="redis://127.0.0.1:1/13")
    try:
        with api.client() as c:
            r = c.post("/v1/events", json=EVENT)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert "did not accept" in r.json()["detail"]
    finally:
        running.stop()
        api.engine.dispose()


def test_lookups_that_sql_cannot_hold_are_refused(api):
    with api.client(READ) as c:
        assert c.get("/v1/documents/documents/a%00b").status_code == 422
        assert c.get("/v1/documents/no%0A/a").status_code == 422
        assert c.get("/v1/requests", params={"model": "v4\x00"}).status_code == 422
        assert c.get("/v1/requests", params={"provider_request_id": "p\x00"}).status_code == 422
        assert c.get("/v1/requests", params={"since": "0001-01-01T00:00:00+05:00"}).status_code == 422
        cursor = base64.urlsafe_b64encode(json.dumps(["2026-11-20T00:00:00", "r\x00"]).encode())
        assert c.get("/v1/requests", params={"cursor": cursor.decode()}).status_code == 422


# --- documents, dead letters ------------------------------------------------------------------


def _event(raw):
    return parse_event(
        raw,
        default_collection="documents",
        default_tenant="default",
        max_text_bytes=1 << 20,
        max_metadata_bytes=1 << 14,
    )


def test_document_state_and_dead_letters(api):
    with api.sessions.begin() as s:
        documents.accept(s, _event({"op": "upsert", "doc_id": "a/b c", "text": "some text", "version": 7}))
        documents.reject(s, {"op": "upsert", "doc_id": "bad"}, "text", "required for upsert; a string")
        dead = add_document(s, "gone", collection="faq", status="dead")
        s.execute(
            sa.update(Document).where(Document.id == dead).values(last_error="InputRejected: no", attempts=3)
        )
        add_request(
            s, "r1", at("2026-11-20T10:00:00"), items=[(dead, 5)], billed=5, cost=2500, provider_id="p1"
        )
    with api.client(READ) as c, api.client() as w:
        doc = c.get("/v1/documents/documents/a/b c").json()
        assert (doc["status"], doc["version"], doc["chunks"], doc["last_error"]) == ("pending", 7, None, None)
        assert len(doc["content_hash"]) == 64
        rejected = c.get("/v1/documents/documents/bad").json()
        assert (
            rejected["status"] == "rejected"
            and rejected["last_error"] == "text: required for upsert; a string"
        )
        assert c.get("/v1/documents/documents/missing").status_code == 404
        assert c.get("/v1/documents/documents/a/b c", params={"tenant": "other"}).status_code == 404
        gone = c.get("/v1/documents/faq/gone").json()
        assert gone["status"] == "dead" and gone["last_requests"][0]["provider_request_id"] == "p1"

        letters = c.get("/v1/deadletters").json()
        assert [(d["id"], d["doc_id"], d["last_error"], d["attempts"]) for d in letters["items"]] == [
            (dead, "gone", "InputRejected: no", 3)
        ]
        assert c.post(f"/v1/deadletters/{dead}/retry").status_code == 403
        assert w.post(f"/v1/deadletters/{dead}/retry").json() == {"retried": 1}
        assert w.post(f"/v1/deadletters/{dead}/retry").status_code == 404
        assert c.get("/v1/documents/faq/gone").json()["status"] == "pending"
        assert c.get("/v1/deadletters").json()["items"] == []
    with api.sessions() as s:
        row = s.get(Document, dead)
        assert (row.attempts, row.lease_owner, row.lease_until) == (0, None, None)


# --- the ledger -------------------------------------------------------------------------------


def test_requests_filters_and_cursor_pagination(api):
    base = at("2026-11-20T00:00:00")
    with api.sessions.begin() as s:
        docs = add_document(s, "d1")
        faq = add_document(s, "f1", collection="faq")
        for i in range(25):
            add_request(
                s,
                f"req-{i:02d}",
                base + dt.timedelta(minutes=i // 2),  # pairs share a timestamp
                items=[(faq if i % 5 == 0 else docs, 10)],
                billed=10,
                cost=5000,
                model="text-embedding-v3" if i % 2 else "text-embedding-v4",
                status="failed" if i == 7 else "succeeded",
                provider_id=f"p-{i}",
            )
    with api.client(READ) as c:
        seen, cursor, pages = [], None, 0
        while True:
            page = c.get(
                "/v1/requests", params={"limit": 10, **({"cursor": cursor} if cursor else {})}
            ).json()
            seen += [r["id"] for r in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and seen == [f"req-{i:02d}" for i in reversed(range(25))]

        def ids(**params):
            return [r["id"] for r in c.get("/v1/requests", params=params).json()["items"]]

        assert ids(collection="faq") == ["req-20", "req-15", "req-10", "req-05", "req-00"]
        assert ids(status="failed") == ["req-07"]
        assert ids(provider_request_id="p-3") == ["req-03"]
        assert len(ids(model="text-embedding-v3")) == 12
        assert ids(since="2026-11-20T00:11:00Z") == ["req-24", "req-23", "req-22"]
        assert ids(since="2026-11-20T00:01:00", until="2026-11-20T00:02:00") == ["req-03", "req-02"]
        first = c.get("/v1/requests", params={"provider_request_id": "p-0"}).json()["items"][0]
        assert first["cost_cny"] == "0.000005000" and first["collections"] == ["faq"]
        assert c.get("/v1/requests", params={"cursor": "garbage"}).status_code == 422
        assert c.get("/v1/requests", params={"status": "lost"}).status_code == 422
        assert c.get("/v1/requests", params={"limit": 0}).status_code == 422


def ledger_for_spend(s) -> None:
    """Three requests whose figures are worked out by hand in the tests below."""
    d1 = add_document(s, "d1", collection="docs", tenant="t1")
    f1 = add_document(s, "f1", collection="faq", tenant="t2")
    # A: v4, 10:15 on the 20th; 41 tokens billed → 41 × 500 = 20 500 nano; items 30 docs / 10 faq.
    #    docs gets 20500·30/40 = 15 375, faq 5 125; tokens 41·30/40 = 30.75 → 31 (largest remainder), 10.
    add_request(s, "A", at("2026-11-20T10:15:00"), items=[(d1, 30), (f1, 10)], billed=41, cost=20_500)
    # B: v3, 11:05 on the 20th; 100 tokens → 50 000 nano; all docs.
    add_request(
        s,
        "B",
        at("2026-11-20T11:05:00"),
        items=[(d1, 100)],
        model="text-embedding-v3",
        billed=100,
        cost=50_000,
    )
    # C: v4, 09:00 on the 21st; failed, nothing billed.
    add_request(
        s,
        "C",
        at("2026-11-21T09:00:00"),
        items=[(f1, 7)],
        status="failed",
        billed=0,
        cost=0,
        http_status=429,
        latency_ms=30.0,
    )
    counters.record_avoided(
        s, "dedup", {("docs", "t1"): 12}, model="text-embedding-v4", now=at("2026-11-20T10:30:00")
    )
    counters.record_avoided(
        s, "coalesced", {("faq", "t2"): 5}, model="text-embedding-v4", now=at("2026-11-21T09:10:00")
    )


def _rows(data: dict, key: str, *fields: str) -> dict:
    return {r[key]: tuple(r[f] for f in fields) for r in data["rows"]}


def test_spend_groupings_match_hand_computed_figures(api):
    with api.sessions.begin() as s:
        ledger_for_spend(s)
    fields = (
        "requests",
        "failed",
        "rows",
        "tokens",
        "cost_cny",
        "tokens_avoided_dedup",
        "tokens_avoided_coalesced",
    )
    with api.client(READ) as c:

        def spend(**params):
            return c.get("/v1/spend", params=params).json()

        day = spend(by="day")
        assert _rows(day, "day", *fields) == {
            "2026-11-20": (2, 0, 3, 141, "0.000070500", 12, 0),
            "2026-11-21": (1, 1, 0, 0, "0.000000000", 0, 5),
        }
        assert day["total"]["cost_cny"] == "0.000070500" and day["total"]["tokens"] == 141
        assert _rows(spend(by="hour"), "hour", "tokens", "tokens_avoided_dedup") == {
            "2026-11-20T10:00Z": (41, 12),
            "2026-11-20T11:00Z": (100, 0),
            "2026-11-21T09:00Z": (0, 0),
        }
        assert _rows(spend(by="model"), "model", "requests", "tokens", "cost_cny") == {
            "text-embedding-v3": (1, 100, "0.000050000"),
            "text-embedding-v4": (2, 41, "0.000020500"),
        }
        assert _rows(spend(by="collection"), "collection", *fields) == {
            "docs": (2, 0, 2, 131, "0.000065375", 12, 0),
            "faq": (2, 1, 1, 10, "0.000005125", 0, 5),
        }
        assert _rows(spend(by="tenant"), "tenant", "tokens", "cost_cny") == {
            "t1": (131, "0.000065375"),
            "t2": (10, "0.000005125"),
        }
        ranged = spend(by="collection", since="2026-11-20T11:00:00Z", until="2026-11-21T00:00:00Z")
        assert _rows(ranged, "collection", "requests", "tokens", "cost_cny") == {
            "docs": (1, 100, "0.000050000")
        }
        assert c.get("/v1/spend", params={"by": "week"}).status_code == 422


def test_metrics_from_sql(api):
    with api.sessions.begin() as s:
        ledger_for_spend(s)
        counters.record_outcomes(s, {"accepted": 3, "stale": 1})
        documents.reject(s, {"op": "x"}, "op", "bad")
        add_document(s, "waiting", status="pending")
    with api.client(READ) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(r.text.splitlines())
    for expected in (
        "sidecar_events_accepted_total 3",
        "sidecar_events_rejected_total 1",
        'sidecar_events_total{outcome="stale"} 1',
        "sidecar_backlog_documents 1",
        'sidecar_rows_embedded_total{model="text-embedding-v4"} 2',
        'sidecar_tokens_total{model="text-embedding-v3"} 100',
        'sidecar_cost_cny_total{model="text-embedding-v4"} 0.000020500',
        'sidecar_provider_throttled_total{model="text-embedding-v4"} 1',
        'sidecar_tokens_avoided_total{kind="dedup"} 12',
        'sidecar_provider_latency_seconds_bucket{model="text-embedding-v4",le="0.05"} 1',
        'sidecar_provider_latency_seconds_bucket{model="text-embedding-v4",le="0.25"} 2',
        'sidecar_provider_latency_seconds_count{model="text-embedding-v4"} 2',
        "sidecar_budget_paused 0",
    ):
        assert expected in lines, expected
    assert any(line.startswith("sidecar_oldest_pending_age_seconds ") for line in lines)


def test_readyz_names_what_is_not_ready(database_url, broker, tmp_path):
    running, api = start_api(database_url, broker, tmp_path, budget_daily_cny="0.00001")
    reader = api.client(READ)
    try:
        r = reader.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        assert {"sql", "broker", "qdrant", "budget"} <= set(r.json()["checks"])
        with api.sessions.begin() as s:
            add_request(
                s, "big", dt.datetime.now(UTC), items=[(add_document(s, "d"), 30)], billed=30, cost=15_000
            )
        r = reader.get("/readyz")
        assert r.status_code == 503
        assert r.json()["reasons"] == [
            "budget: daily cap of CNY 0.00001 for all collections reached: spent 0.000015; resumes at "
            f"{(dt.datetime.now(UTC) + dt.timedelta(days=1)):%Y-%m-%d}T00:00Z or when the cap is raised"
        ]
        with api.client(READ) as c:
            assert "sidecar_budget_paused 1" in c.get("/metrics").text
    finally:
        reader.close()
        running.stop()
        api.engine.dispose()


def test_readyz_without_a_token_says_only_whether_ready(database_url, broker, tmp_path):
    running, api = start_api(database_url, broker, tmp_path, budget_daily_cny="0.00001")
    try:
        assert httpx.get(f"{api.url}/readyz").json() == {"ready": True}
        with api.sessions.begin() as s:
            add_request(
                s, "big", dt.datetime.now(UTC), items=[(add_document(s, "d"), 30)], billed=30, cost=15_000
            )
        r = httpx.get(f"{api.url}/readyz", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 503 and r.json() == {"ready": False}
        with api.client(READ) as c:
            assert c.get("/readyz").json()["checks"]["budget"] == {"ok": False, "detail": "budget paused"}
    finally:
        running.stop()
        api.engine.dispose()


def test_readyz_details_hide_urls_hosts_and_credentials(database_url, broker, tmp_path):
    running, api = start_api(
        database_url,
        broker,
        tmp_path,
        qdrant_url="http://admin:hunter2@127.0.0.1:1/internal/qdrant",
        qdrant_api_key="qdrant-secret",
        broker_url="redis://:redis-secret@127.0.0.1:1/13",
    )
    try:
        with api.client(READ) as c:
            r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["checks"]["qdrant"] == {"ok": False, "detail": "vector store unreachable"}
        assert body["checks"]["broker"] == {"ok": False, "detail": "broker unreachable"}
        assert body["reasons"] == ["broker unreachable", "vector store unreachable"]
        for secret in ("hunter2", "admin", "127.0.0.1", "internal", "qdrant-secret", "redis-secret"):
            assert secret not in r.text
    finally:
        running.stop()
        api.engine.dispose()


def test_openapi_schema_fuzzed_without_server_errors(sqlite_url, broker, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings

    running, api = start_api(sqlite_url, broker, tmp_path)
    try:
        schema_ = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
        failures = []
        for operation in schema_.get_all_operations():
            op = operation.ok()

            @hsettings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def run(case):
                response = case.call(base_url=api.url, headers={"Authorization": f"Bearer {WRITE}"})
                if response.status_code >= 500:
                    failures.append(
                        (case.method, case.formatted_path, response.status_code, response.text[:300])
                    )

            run()
        assert failures == []
    finally:
        running.stop()
        api.engine.dispose()
