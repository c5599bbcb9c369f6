"""Price a backfill before anything is sent: the worker's coalescing, chunking, deduplication and
batching, replayed as arithmetic over parsed events (`sidecar estimate` reads the file and prints).

Plain functions over plain data. The chunk size is `chunking.token_limit`, the chunks are
`chunking.split_text`'s and the requests `batching.plan_batches`', so the estimate follows the
worker's own rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from worker import batching, chunking, tokens
from worker.catalog import ModelSpec, RateLimits
from worker.events import Event


@dataclass(frozen=True)
class Coalesced:
    documents: list[Event]  # the last version of each document, in order of first appearance
    superseded: list[str]  # upsert texts a later version replaced: never embedded


@dataclass(frozen=True)
class UniqueRows:
    rows: list[batching.Row]  # one row per distinct chunk text, in order of first appearance
    chunks: int  # every chunk, duplicates included
    dedup_tokens: int  # tokens of the duplicates: embedded once


@dataclass(frozen=True)
class Plan:
    documents: int
    deletes: int
    chunks: int
    rows: int
    requests: int
    tokens: int
    tokens_avoided_dedup: int
    tokens_avoided_coalesced: int


def coalesce(events: Iterable[Event]) -> Coalesced:
    """Keep each document's latest version; an event without one comes after the held one, and
    an event at or below the held version changes nothing."""
    latest: dict[tuple[str, str, str], tuple[int, Event]] = {}
    superseded: list[str] = []
    for event in events:
        key = (event.tenant, event.collection, event.doc_id)
        held = latest.get(key)
        if held is None:
            latest[key] = (event.version or 0, event)
            continue
        version = held[0] + 1 if event.version is None else event.version
        newer = version > held[0]
        loser = held[1] if newer else event
        if loser.op == "upsert" and loser.text:
            superseded.append(loser.text)
        if newer:
            latest[key] = (version, event)
    return Coalesced([event for _version, event in latest.values()], superseded)


def unique_rows(documents: Iterable[Event], *, max_tokens: int, overlap_tokens: int) -> UniqueRows:
    """The chunks of every upsert, each distinct text once (the embedding cache's dedup)."""
    rows: dict[str, batching.Row] = {}
    chunks = dedup_tokens = 0
    for event in documents:
        if event.op != "upsert":
            continue
        for chunk in chunking.split_text(
            event.text or "", max_tokens=max_tokens, overlap_tokens=overlap_tokens
        ):
            chunks += 1
            if chunk.content_hash in rows:
                dedup_tokens += chunk.tokens
            else:
                rows[chunk.content_hash] = batching.Row(chunk.content_hash, chunk.text, chunk.tokens)
    return UniqueRows(list(rows.values()), chunks, dedup_tokens)


def plan(
    events: Iterable[Event], spec: ModelSpec, *, chunk_max_tokens: int | None, overlap_tokens: int
) -> Plan:
    """What the worker would send for `events`: documents, chunks, rows, requests and tokens."""
    coalesced = coalesce(events)
    unique = unique_rows(
        coalesced.documents,
        max_tokens=chunking.token_limit(chunk_max_tokens, spec.max_tokens_per_row),
        overlap_tokens=overlap_tokens,
    )
    batches = batching.plan_batches(
        unique.rows, max_rows=spec.max_rows, max_tokens_per_row=spec.max_tokens_per_row
    )
    return Plan(
        documents=len(coalesced.documents),
        deletes=sum(event.op == "delete" for event in coalesced.documents),
        chunks=unique.chunks,
        rows=len(unique.rows),
        requests=len(batches),
        tokens=sum(row.tokens for row in unique.rows),
        tokens_avoided_dedup=unique.dedup_tokens,
        tokens_avoided_coalesced=sum(tokens.count_tokens(text) for text in coalesced.superseded),
    )


def min_duration_s(requests: int, total_tokens: int, limits: RateLimits) -> float:
    """The least time the rate limits allow for sending `requests` carrying `total_tokens`."""
    if not requests:
        return 0.0
    return max(requests / limits.requests_per_second, total_tokens / limits.tokens_per_second)
