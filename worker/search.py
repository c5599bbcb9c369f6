"""The query side: a search text embedded as a query, then the nearest chunks from the store.

    check the query → in-process cache of query embeddings (hit: no call, no ledger row)
    → limiter.acquire → budget check + ledger intent (lane "query") → embed(text_type="query")
    → ledger result → store.search (dense; fused with the sparse vector when hybrid is on)

A `Searcher` is built from a worker/runtime.py `Runtime`: the worker's, in `sidecar serve`; the
API's own when it reaches a Qdrant server; or the CLI's. The query text is never logged.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from worker import pipeline, tokens
from worker.embedding.base import TextType
from worker.errors import InvalidQuery, NoSuchCollection, RetryLater, SidecarError
from worker.events import NAME_PATTERN
from worker.ledger import calls
from worker.reembed import routes
from worker.runtime import Runtime
from worker.sql import pauses
from worker.sql.cache import Embedded
from worker.sql.models import utcnow
from worker.vectorstore.base import Hit

log = logging.getLogger(__name__)

MAX_QUERY_TOKENS = 2048  # and never more than the model's max tokens per row
MAX_QUERY_CHARS = 32_768  # bounds the work of counting tokens before the token cap applies
MAX_LIMIT = 100
MAX_FILTER_KEYS = 16
QUERY_WAIT_S = 5.0  # a search waits this long at most for the rate limiter
META_KEY_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
QUERY: TextType = "query"

CacheKey = tuple[str, int, str, str, str]  # model, dimensions, api, text_type, text


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    request_id: str | None  # the ledger row of the embedding call; None when served from the cache
    cached: bool

    def as_json(self) -> dict[str, Any]:
        """The answer of GET /v1/search and `sidecar search --json`."""
        hits = [
            {
                "doc_id": h.doc_id,
                "chunk_index": h.chunk_index,
                "score": h.score,
                "version": h.version,
                "text": h.text,
                "meta": h.meta,
            }
            for h in self.hits
        ]
        return {"hits": hits, "request_id": self.request_id, "cached": self.cached}


class QueryCache:
    """A bounded LRU of query embeddings, shared by the threads of one process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[CacheKey, Embedded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Embedded | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: CacheKey, value: Embedded) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def check_query(
    collection: str, text: str, *, limit: int, tenant: str | None, meta: dict[str, Any] | None
) -> None:
    """InvalidQuery naming the first parameter that breaks its rule (text: its size only)."""
    if re.fullmatch(NAME_PATTERN, collection) is None:
        raise InvalidQuery("collection", f"must match {NAME_PATTERN}")
    if tenant is not None and re.fullmatch(NAME_PATTERN, tenant) is None:
        raise InvalidQuery("tenant", f"must match {NAME_PATTERN}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery("limit", f"an integer from 1 to {MAX_LIMIT}")
    if not text.strip():
        raise InvalidQuery("q", "must not be empty")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidQuery("q", f"at most {MAX_QUERY_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidQuery("q", "must be valid Unicode (no lone surrogates)") from None
    check_filter(meta)


def check_filter(meta: dict[str, Any] | None) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or len(meta) > MAX_FILTER_KEYS:
        raise InvalidQuery("filter", f"a JSON object of at most {MAX_FILTER_KEYS} meta keys")
    for key, value in meta.items():
        if not isinstance(key, str) or re.fullmatch(META_KEY_PATTERN, key) is None:
            raise InvalidQuery("filter", f"keys must match {META_KEY_PATTERN}")
        if not isinstance(value, str | int | bool):  # what an exact match can compare (bool is an int)
            raise InvalidQuery("filter", f"value of {key!r} must be a string, an integer or a boolean")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise InvalidQuery("filter", f"value of {key!r} must fit in 64 bits")


class Searcher:
    """Searches one process's store; safe to share between threads."""

    def __init__(self, rt: Runtime, *, cache: QueryCache | None = None) -> None:
        self.rt = rt
        self.cache = cache if cache is not None else QueryCache(rt.settings.search_cache_size)
        self.max_query_tokens = min(MAX_QUERY_TOKENS, rt.spec.max_tokens_per_row)
        self._known: set[str] = set()  # collections seen holding chunks

    def search(
        self,
        collection: str,
        text: str,
        *,
        limit: int = 5,
        tenant: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> SearchResult:
        """The `limit` nearest chunks to `text`. Raises InvalidQuery, NoSuchCollection, RetryLater
        (BudgetExceeded, throttled, provider or store unavailable) or GiveUp (text refused)."""
        started = time.monotonic()
        check_query(collection, text, limit=limit, tenant=tenant, meta=meta)
        rt = routes.for_search(self.rt, collection)  # the collection's model and physical collection
        self._check_collection(rt, collection)
        text = tokens.normalize(text)
        key: CacheKey = (rt.embedder.model, rt.embedder.dimensions, rt.embedder.api, QUERY, text)
        embedded, request_id = self.cache.get(key), None
        if embedded is None:
            embedded, request_id = self._embed(rt, collection, tenant, text)
            self.cache.put(key, embedded)
        sparse = embedded.sparse if rt.settings.sparse_vectors else None
        hits = rt.store.search(
            collection, embedded.vector, limit=limit, tenant=tenant, meta=meta or None, sparse=sparse
        )
        log.info(
            "search.done collection=%s hits=%d cached=%s request_id=%s ms=%.0f",
            collection,
            len(hits),
            request_id is None,
            request_id,
            (time.monotonic() - started) * 1000,
        )
        return SearchResult(hits=hits, request_id=request_id, cached=request_id is None)

    def _check_collection(self, rt: Runtime, collection: str) -> None:
        """NoSuchCollection before anything is paid for, when the collection holds no chunk."""
        if collection in self._known:
            return
        if rt.store.count(collection) == 0:
            raise NoSuchCollection(f"collection {collection!r} holds no indexed documents")
        self._known.add(collection)

    def _embed(self, rt: Runtime, collection: str, tenant: str | None, text: str) -> tuple[Embedded, str]:
        """One paid call for one query, through the limiter, the budget and the ledger."""
        est_tokens = tokens.count_tokens(text)
        if est_tokens > self.max_query_tokens:
            raise InvalidQuery("q", f"{est_tokens} tokens is over the cap of {self.max_query_tokens}")
        permit = rt.limiter.acquire(est_tokens, timeout_s=QUERY_WAIT_S)
        try:
            request_id = self._open_request(rt, collection, tenant, est_tokens)
        except RetryLater:  # a budget cap or a provider pause: the slot was not used
            rt.limiter.settle(permit, 0)
            raise
        try:
            result = rt.embedder.embed([text], text_type=QUERY)
        except SidecarError as exc:
            rt.limiter.settle(permit, 0)
            if exc.call is not None and exc.call.http_status == 429:
                rt.limiter.throttled(getattr(exc, "retry_after_s", None), permit=permit)
            pipeline.record_failure(rt, request_id, est_tokens, exc)
            log.warning("search.embed_failed id=%s error=%s", request_id, type(exc).__name__)
            raise
        rt.limiter.settle(permit, result.billed_tokens)
        with rt.sessions.begin() as session:
            calls.record_success(session, request_id, result, rt.spec.cost_nano_cny(result.billed_tokens))
        return Embedded(result.vectors[0], result.sparse[0] if result.sparse else None), request_id

    def _open_request(self, rt: Runtime, collection: str, tenant: str | None, est_tokens: int) -> str:
        """The ledger's intent row, after the budget check in its transaction; our request id."""
        request_id = str(uuid.uuid4())
        with rt.sessions.begin() as session:
            pause = pauses.active(session)
            if pause is not None:
                wait_s = max(1.0, (pause.until - utcnow()).total_seconds())
                raise RetryLater(f"provider calls are paused: {pause.reason}", retry_after_s=wait_s)
            if rt.budget_check is not None:
                rt.budget_check(session, {collection}, est_tokens)
            calls.open_request(
                session,
                request_id=request_id,
                model=rt.embedder.model,
                dimensions=rt.embedder.dimensions,
                api=rt.embedder.api,
                rows=1,
                est_tokens=est_tokens,
                items=[],
                attempt=1,
                key_fingerprint=rt.settings.key_fingerprint(),
                worker=rt.owner,
                lane="query",
                collection=collection,
                tenant=tenant,
            )
        return request_id
