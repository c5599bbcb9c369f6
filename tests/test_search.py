"""The query side on real parts: documents indexed by the pipeline (SQL, a Qdrant store, HTTP to the
emulator), then searched in-process, over real HTTP (uvicorn on loopback) and from the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from api.app import create_app
from api.cli import main
from api.emulator import expected_vector
from tests.fixtures.runtime import make_settings
from tests.test_api import READ, WRITE, RunningApi
from worker import pipeline, search
from worker.errors import GiveUp, InvalidQuery, NoSuchCollection
from worker.ledger import budget, spending
from worker.runtime import Runtime, build_runtime
from worker.search import QueryCache, Searcher, check_query
from worker.settings import Settings
from worker.sql import schema
from worker.sql.cache import Embedded
from worker.sql.models import ProviderRequest
from worker.tasks import ingest_events
from worker.vectorstore.base import RRF_K

DOCS = [
    ("tea-1", "a", {"lang": "en"}, "Green tea from the misty hills of Hangzhou, picked in early spring."),
    ("coffee", "a", {"lang": "en"}, "Black coffee roasted dark, brewed strong at dawn in a copper pot."),
    ("tea-2", "b", {"lang": "ja"}, "The tea ceremony of Kyoto: whisked matcha served in silence."),
    ("bread", "b", {"lang": "en"}, "Sourdough bread with a crackling crust and an open, chewy crumb."),
    ("rain", "a", {"lang": "fr"}, "La pluie tombe doucement sur les toits de Paris en automne."),
]
API_TOKENS = {"api_tokens": WRITE, "api_read_tokens": READ}


def index(rt: Runtime, docs=DOCS, collection: str = "documents") -> None:
    events = [
        {"op": "upsert", "doc_id": d, "tenant": t, "metadata": m, "text": text, "collection": collection}
        for d, t, m, text in docs
    ]
    assert ingest_events(rt, events) == {"accepted": len(events)}
    for _ in range(50):
        if pipeline.run_cycle(rt).idle:
            return
    raise AssertionError("work did not drain")


def ledger(rt: Runtime) -> list[ProviderRequest]:
    with rt.sessions() as session:
        return list(
            session.execute(sa.select(ProviderRequest).order_by(ProviderRequest.created_at)).scalars()
        )


@pytest.fixture(params=["fixture", "embedded"])
def indexed(request, make_runtime, database_url, emulator, tmp_path) -> Iterator[Runtime]:
    """A runtime with DOCS indexed: on the fixture's store (local mode in memory, or the server of
    SIDECAR_TEST_QDRANT_URL), or on the embedded default `build_store` picks with no path or URL."""
    if request.param == "fixture":
        rt = make_runtime(**API_TOKENS)
        index(rt)
        yield rt
        return
    settings = make_settings(database_url, emulator.url, tmp_path / "data", **API_TOKENS)
    schema.upgrade(database_url)
    rt = build_runtime(settings)
    try:
        index(rt)
        yield rt
    finally:
        rt.close()


# --- in-process ---------------------------------------------------------------------------------


def test_exact_text_ranks_first_filters_and_limit(indexed):
    searcher = Searcher(indexed)
    for doc_id, _tenant, _meta, text in DOCS:
        result = searcher.search("documents", text, limit=3)
        assert result.hits[0].doc_id == doc_id
        assert len(result.hits) == 3
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores, reverse=True)
    tea = DOCS[0][3]
    assert {h.tenant for h in searcher.search("documents", tea, limit=5, tenant="b").hits} == {"b"}
    assert [h.doc_id for h in searcher.search("documents", tea, limit=5, meta={"lang": "ja"}).hits] == [
        "tea-2"
    ]
    assert searcher.search("documents", tea, limit=5, tenant="a", meta={"lang": "ja"}).hits == []
    hit = searcher.search("documents", tea, limit=1).hits[0]
    assert (hit.chunk_index, hit.version, hit.text, hit.meta) == (0, 0, tea, {"lang": "en"})


def test_query_ledger_row_then_cached_without_call_or_row(indexed, emulator):
    searcher = Searcher(indexed)
    before, billed = len(ledger(indexed)), len(emulator.bill()["requests"])
    first = searcher.search("documents", "a cup of green tea", limit=2, tenant="a")
    assert not first.cached and first.request_id is not None
    rows = ledger(indexed)
    assert len(rows) == before + 1
    row = rows[-1]
    assert (row.id, row.lane, row.collection, row.tenant, row.status, row.rows) == (
        first.request_id,
        "query",
        "documents",
        "a",
        "succeeded",
        1,
    )
    bill = emulator.bill()["requests"]
    assert len(bill) == billed + 1 and bill[-1]["request_id"] == row.provider_request_id
    assert row.billed_tokens == bill[-1]["tokens"] and row.cost_nano_cny == row.billed_tokens * 500
    assert {r.lane for r in rows[:-1]} == {"realtime"}

    again = searcher.search("documents", "a cup of green tea", limit=2, tenant="a")
    assert again.cached and again.request_id is None
    assert [h.doc_id for h in again.hits] == [h.doc_id for h in first.hits]
    assert len(ledger(indexed)) == before + 1
    assert len(emulator.bill()["requests"]) == billed + 1


def test_spend_by_lane_and_query_rows_count_for_their_collection(make_runtime):
    rt = make_runtime()
    index(rt)
    index(rt, DOCS[:2], collection="other")  # same texts: vectors already paid for, no call
    Searcher(rt).search("other", "roasted coffee", limit=1)
    with rt.sessions() as session:
        by_lane = spending.spend(session, by="lane")
        by_collection = spending.spend(session, by="collection")
        by_tenant = spending.spend(session, by="tenant")
        total = spending.spend(session)
    rows = ledger(rt)
    query = [r for r in rows if r.lane == "query"]
    assert len(query) == 1
    lanes = {r["lane"]: r for r in by_lane["rows"]}
    assert set(lanes) == {"realtime", "query"}
    assert lanes["query"]["requests"] == 1 and lanes["query"]["tokens"] == query[0].billed_tokens
    assert lanes["realtime"]["tokens"] == sum(r.billed_tokens for r in rows if r.lane == "realtime")
    assert by_lane["total"]["tokens"] == total["total"]["tokens"] == sum(r.billed_tokens for r in rows)
    assert by_lane["total"]["tokens_avoided_dedup"] == total["total"]["tokens_avoided_dedup"] > 0
    collections = {r["collection"]: r for r in by_collection["rows"]}
    assert collections["other"]["tokens"] == query[0].billed_tokens  # the copies cost nothing
    assert by_collection["total"]["tokens"] == by_lane["total"]["tokens"]
    assert {r["tenant"] for r in by_tenant["rows"]} >= {"a", "b", None}  # the query named no tenant


def test_hybrid_query_fuses_dense_and_sparse(make_runtime, emulator):
    rt = make_runtime(embedding_api="native", sparse_vectors=True)
    index(rt)
    searcher = Searcher(rt)
    text = DOCS[1][3]
    result = searcher.search("documents", text, limit=3)
    assert result.hits[0].doc_id == "coffee"
    assert result.hits[0].score == pytest.approx(2 / (RRF_K + 1))  # first in both rankings
    key = (rt.embedder.model, rt.embedder.dimensions, rt.embedder.api, "query", text)
    cached = searcher.cache.get(key)
    assert cached is not None and cached.sparse
    want = expected_vector(rt.embedder.model, rt.embedder.dimensions, text, "query")
    assert max(abs(a - b) for a, b in zip(cached.vector, want, strict=True)) < 1e-6  # text_type=query


def test_budget_cap_stops_a_query_but_not_a_cached_one(make_runtime, emulator):
    rt = make_runtime()
    index(rt)
    searcher = Searcher(rt)
    searcher.search("documents", "green tea", limit=1)
    with rt.sessions.begin() as session:
        budget.set_cap(session, collection="documents", period="day", limit_nano=1)
    billed, rows = len(emulator.bill()["requests"]), len(ledger(rt))
    with pytest.raises(budget.BudgetExceeded, match="daily cap"):
        searcher.search("documents", "black coffee", limit=1)
    assert searcher.search("documents", "green tea", limit=1).cached
    assert (len(emulator.bill()["requests"]), len(ledger(rt))) == (billed, rows)


def test_refused_text_closes_its_ledger_row_failed(make_runtime, emulator):
    rt = make_runtime()
    index(rt)
    with pytest.raises(GiveUp):
        Searcher(rt).search("documents", "tea <<BLOCKED>>", limit=1)
    row = ledger(rt)[-1]
    assert (row.lane, row.status, row.billed_tokens, row.collection) == ("query", "failed", 0, "documents")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("bad name!", "tea", 5, None, None), "collection"),
        (("documents", "tea", 5, "a b", None), "tenant"),
        (("documents", "tea", 0, None, None), "limit"),
        (("documents", "tea", search.MAX_LIMIT + 1, None, None), "limit"),
        (("documents", "   ", 5, None, None), "q"),
        (("documents", "x" * (search.MAX_QUERY_CHARS + 1), 5, None, None), "q"),
        (("documents", "tea \ud800", 5, None, None), "q"),
        (("documents", "tea", 5, None, {"lang": 1.5}), "filter"),
        (("documents", "tea", 5, None, {"lang": ["en"]}), "filter"),
        (("documents", "tea", 5, None, {"a.b": "x"}), "filter"),
        (("documents", "tea", 5, None, {f"k{i}": 1 for i in range(search.MAX_FILTER_KEYS + 1)}), "filter"),
    ],
)
def test_bad_queries_name_their_parameter(args, field):
    collection, text, limit, tenant, meta = args
    with pytest.raises(InvalidQuery) as caught:
        check_query(collection, text, limit=limit, tenant=tenant, meta=meta)
    assert caught.value.field == field


def test_long_query_and_unknown_collection_cost_nothing(make_runtime, emulator):
    rt = make_runtime()
    index(rt)
    searcher = Searcher(rt)
    with pytest.raises(InvalidQuery, match="tokens is over the cap"):
        searcher.search("documents", "tea " * 3000, limit=1)
    with pytest.raises(NoSuchCollection):
        searcher.search("nothing_here", "tea", limit=1)
    assert {r.lane for r in ledger(rt)} == {"realtime"}


def test_query_cache_is_a_bounded_lru():
    cache = QueryCache(2)
    e = Embedded([1.0])
    keys = [("m", 1, "compatible", "query", t) for t in "abc"]
    cache.put(keys[0], e)
    cache.put(keys[1], e)
    assert cache.get(keys[0]) is e  # now the most recent
    cache.put(keys[2], e)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is e and len(cache) == 2
    off = QueryCache(0)
    off.put(keys[0], e)
    assert off.get(keys[0]) is None


# --- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture()
def served(indexed) -> Iterator[tuple[Runtime, httpx.Client]]:
    running = RunningApi(create_app(indexed.settings, runtime=indexed))
    with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {READ}"}, timeout=10) as c:
        yield indexed, c
    running.stop()


def test_http_search_answers_hits_and_caches(served, emulator):
    _rt, c = served
    params = {"collection": "documents", "q": DOCS[2][3], "limit": 2}
    first = c.get("/v1/search", params=params)
    assert first.status_code == 200, first.text
    body = first.json()
    assert set(body) == {"hits", "request_id", "cached"} and body["cached"] is False
    assert set(body["hits"][0]) == {"doc_id", "chunk_index", "score", "version", "text", "meta"}
    assert body["hits"][0]["doc_id"] == "tea-2" and len(body["hits"]) == 2
    again = c.get("/v1/search", params=params).json()
    assert again["cached"] is True and again["request_id"] is None and again["hits"] == body["hits"]
    filtered = c.get("/v1/search", params={**params, "limit": 5, "filter": '{"lang": "en"}', "tenant": "a"})
    assert {h["doc_id"] for h in filtered.json()["hits"]} == {"tea-1", "coffee"}
    default = c.get("/v1/search", params={"q": "bread"}).json()  # the default collection
    assert default["hits"][0]["doc_id"] == "bread"
    row = c.get("/v1/requests", params={"collection": "documents", "limit": 1}).json()["items"][0]
    assert (row["id"], row["lane"], row["collections"]) == (default["request_id"], "query", ["documents"])
    spend = {r["lane"]: r for r in c.get("/v1/spend", params={"group_by": "lane"}).json()["rows"]}
    assert spend["query"]["requests"] == 2 and spend["realtime"]["requests"] >= 1
    assert c.get("/v1/spend", params={"by": "lane"}).json()["rows"] == list(spend.values())
    assert c.get("/v1/spend", params={"by": "day", "group_by": "lane"}).status_code == 422


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"limit": 0}, 422, "limit"),
        ({"limit": 101}, 422, "limit"),
        ({"collection": "no way"}, 422, "collection"),
        ({"tenant": "a/b"}, 422, "tenant"),
        ({"filter": "{not json"}, 422, "filter"),
        ({"filter": "[1]"}, 422, "filter"),
        ({"filter": '{"lang": {"$ne": 1}}'}, 422, "filter"),
        ({"q": ""}, 422, "q"),
        ({"q": "   "}, 422, "q"),
        ({"q": "tea " * 3000}, 422, "q"),
        ({"collection": "nothing_here"}, 404, None),
    ],
)
def test_http_bad_input_names_the_parameter(served, params, status, field):
    _rt, c = served
    answer = c.get("/v1/search", params={"q": "tea", **params})
    assert answer.status_code == status, answer.text
    if field is not None:
        assert any(p["loc"][-1] == field for p in answer.json()["detail"])


def test_http_needs_a_read_token_and_budget_answers_429(served):
    rt, c = served
    assert httpx.get(str(c.base_url.join("/v1/search")), params={"q": "tea"}).status_code == 401
    with rt.sessions.begin() as session:
        budget.set_cap(session, collection=None, period="month", limit_nano=0)
    refused = c.get("/v1/search", params={"q": "anything at all"})
    assert refused.status_code == 429
    assert "monthly cap" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1


def test_http_without_a_store_says_why(database_url, emulator, tmp_path):
    schema.upgrade(database_url)
    settings = make_settings(database_url, emulator.url, tmp_path, **API_TOKENS)
    running = RunningApi(create_app(settings))
    try:
        answer = httpx.get(
            f"{running.url}/v1/search", params={"q": "tea"}, headers={"Authorization": f"Bearer {READ}"}
        )
    finally:
        running.stop()
    assert answer.status_code == 503
    assert "run `sidecar serve`" in answer.json()["detail"]


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture()
def cli_env(monkeypatch, sqlite_url, emulator, tmp_path) -> Settings:
    """Settings in the environment (as a user has them); DOCS indexed in the embedded store, which
    the returned runtime has closed again."""
    values = {
        "SIDECAR_DATA_DIR": str(tmp_path / "data"),
        "SIDECAR_DATABASE_URL": sqlite_url,
        "SIDECAR_DASHSCOPE_URL": emulator.url,
        "DASHSCOPE_API_KEY": "sk-emulator",
        "SIDECAR_API_READ_TOKENS": READ,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env of the repository
    schema.upgrade(sqlite_url)
    settings = make_settings(sqlite_url, emulator.url, tmp_path / "data", api_read_tokens=READ)
    rt = build_runtime(settings)
    index(rt)
    rt.close()
    return settings


def test_cli_search_prints_json_and_a_table(cli_env, capsys):
    assert main(["search", DOCS[3][3], "--json", "--limit", "2"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["hits"][0]["doc_id"] == "bread" and len(body["hits"]) == 2 and body["cached"] is False
    assert main(["search", "green tea", "--tenant", "b", "--filter", '{"lang": "ja"}']) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "doc_id", "chunk", "version", "text"]
    assert table[1].split()[:5][2:] == ["tea-2", "0", "0"] and "matcha" in table[1]
    assert main(["search", "tea", "--limit", "0"]) == 2
    assert "limit" in capsys.readouterr().err


def test_cli_search_falls_back_to_the_api_when_the_store_is_held(cli_env, capsys):
    rt = build_runtime(cli_env)  # holds the embedded store, as `sidecar serve` does
    running = RunningApi(create_app(cli_env, runtime=rt))
    try:
        assert main(["search", "sourdough"]) == 2
        err = capsys.readouterr().err
        assert "--api" in err and "sidecar serve" in err
        assert main(["search", "sourdough", "--api", running.url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["hits"][0]["doc_id"] == "bread"
        assert main(["search", "sourdough", "--api", running.url, "--token", "wrong"]) == 1
        assert "HTTP 401" in capsys.readouterr().err
    finally:
        running.stop()
        rt.close()


# --- the bench, tiny --------------------------------------------------------------------------


def test_search_bench_prints_a_table_and_json(tmp_path, capsys):
    from bench import search as bench_search

    assert (
        bench_search.main(["--points", "200", "--queries", "40", "--latency-ms", "5", "--dir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    assert {"points", "fresh", "cached"} <= set(figures)
    assert figures["fresh"]["queries"] > 0 and figures["cached"]["queries"] > 0
    assert figures["cached"]["p50_ms"] <= figures["fresh"]["p50_ms"]
