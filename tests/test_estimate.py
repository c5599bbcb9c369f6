"""The backfill arithmetic of worker/estimate.py, from tables."""

from __future__ import annotations

import pytest

from worker import estimate, tokens
from worker.catalog import MODELS, RateLimits
from worker.events import Event

V4 = MODELS["text-embedding-v4"]


def event(doc_id: str, text: str | None = None, version: int | None = None, *, tenant: str = "t") -> Event:
    op = "delete" if text is None else "upsert"
    return Event(op, doc_id, "docs", tenant, version, text, None, None)


@pytest.mark.parametrize(
    ("events", "kept", "superseded"),
    [
        ([], [], []),
        ([event("a", "one", 1)], ["one"], []),
        # a later version replaces the held one; an older or equal one changes nothing
        ([event("a", "one", 1), event("a", "two", 2)], ["two"], ["one"]),
        ([event("a", "one", 2), event("a", "old", 1)], ["one"], ["old"]),
        ([event("a", "one", 2), event("a", "dup", 2)], ["one"], ["dup"]),
        # without a version, arrival order is the version
        ([event("a", "one"), event("a", "two"), event("a", "three")], ["three"], ["one", "two"]),
        ([event("a", "one", 5), event("a", "two")], ["two"], ["one"]),
        # a delete supersedes text, and superseding a delete avoids nothing
        ([event("a", "one", 1), event("a", None, 2)], [None], ["one"]),
        ([event("a", None, 1), event("a", "two", 2)], ["two"], []),
        # tenants keep documents apart
        ([event("a", "one", 1), event("a", "two", 1, tenant="u")], ["one", "two"], []),
    ],
)
def test_coalesce(events: list[Event], kept: list[str | None], superseded: list[str]) -> None:
    result = estimate.coalesce(events)
    assert [e.text for e in result.documents] == kept
    assert sorted(result.superseded) == sorted(superseded)


def test_unique_rows_count_each_text_once() -> None:
    docs = [event("a", "same words"), event("b", "same words"), event("c", "other words"), event("d")]
    result = estimate.unique_rows(docs, max_tokens=100, overlap_tokens=0)
    assert [row.text for row in result.rows] == ["same words", "other words"]
    assert result.chunks == 3
    assert result.dedup_tokens == tokens.count_tokens("same words")


def test_plan_chunks_dedups_and_batches() -> None:
    texts = [f"note {i} on tea" for i in range(23)]
    events = [event(f"d{i}", t, 1) for i, t in enumerate(texts)]
    events += [event("d0", "an older draft", 0), event("copy", texts[1]), event("gone")]
    plan = estimate.plan(events, V4, chunk_max_tokens=None, overlap_tokens=0)
    counts = [tokens.count_tokens(t) for t in texts]
    assert plan == estimate.Plan(
        documents=25,
        deletes=1,
        chunks=24,
        rows=23,
        requests=3,  # text-embedding-v4 takes 10 rows a request
        tokens=sum(counts),
        tokens_avoided_dedup=counts[1],
        tokens_avoided_coalesced=tokens.count_tokens("an older draft"),
    )


def test_plan_uses_the_configured_chunk_size() -> None:
    text = " ".join(f"word{i}" for i in range(200))
    plan = estimate.plan([event("a", text)], V4, chunk_max_tokens=50, overlap_tokens=0)
    assert plan.chunks == plan.rows > tokens.count_tokens(text) // 50


@pytest.mark.parametrize(
    ("requests", "total_tokens", "rpm", "tpm", "expected"),
    [
        (0, 0, 60, 600, 0.0),
        (3, 30, 30, 600, 6.0),  # the request limit binds: 3 requests at 0.5 a second
        (3, 1000, 30, 600, 100.0),  # the token limit binds: 1000 tokens at 10 a second
    ],
)
def test_min_duration_s(requests: int, total_tokens: int, rpm: int, tpm: int, expected: float) -> None:
    assert estimate.min_duration_s(requests, total_tokens, RateLimits(rpm, tpm)) == pytest.approx(expected)
