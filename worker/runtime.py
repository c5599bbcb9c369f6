"""Wiring: the one place that picks an implementation for each seam from the settings.

Built after fork (Celery's worker_process_init) or on first use, never at import time.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from worker import catalog, chunking
from worker.embedding.base import Embedder
from worker.ledger import budget
from worker.limiter import (
    Limits,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    limiter_key,
)
from worker.settings import Settings
from worker.sql import cache, engines
from worker.vectorstore.qdrant import QdrantStore, VectorStore


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    store: VectorStore
    embedder: Embedder
    limiter: RateLimiter
    spec: catalog.ModelSpec
    process: str  # host:pid
    chunk_max_tokens: int
    wake: threading.Event = field(default_factory=threading.Event)
    probing: bool = False  # a provider pause expired: the next success clears it
    held_since: dict[int, float] = field(default_factory=dict)  # document id → first held back
    # Called with (session, work, rows, est_tokens) in the transaction of each ledger intent row;
    # raises (BudgetExceeded) to hold the call back.
    budget_check: Callable[..., None] | None = None
    # Fault injection for tests: called at named points of the pipeline; raises to simulate a crash.
    crash_hook: Callable[[str], None] | None = None

    @property
    def owner(self) -> str:
        """The lease owner: this thread of this process, so threads never act on each other's leases."""
        return f"{self.process}:{threading.get_ident()}"

    def crash(self, point: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(point)

    def cache_key(self, content_hash: str) -> str:
        return cache.cache_key(
            self.embedder.model, self.embedder.dimensions, content_hash, sparse=self.settings.sparse_vectors
        )

    def close(self) -> None:
        self.embedder.close()
        self.store.close()
        self.engine.dispose()


class SerializedStore:
    """One call at a time into a store that is not thread-safe (qdrant-client local mode)."""

    def __init__(self, store: VectorStore) -> None:
        self._store = store
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


def build_store(settings: Settings) -> VectorStore:
    store = QdrantStore.from_settings(settings)
    return store if settings.qdrant_url else SerializedStore(store)  # type: ignore[return-value]


def build_embedder(settings: Settings) -> Embedder:
    from worker.embedding.dashscope import DashScopeEmbedder

    return DashScopeEmbedder.from_settings(settings)


def build_limiter(settings: Settings) -> RateLimiter:
    """Shared by every process through Redis when SIDECAR_REDIS_URL is set; else this process's."""
    rates = settings.rate_limits()
    # Book slots up to a second ahead: threads that wake late then lose no capacity.
    limits = Limits(rates.requests_per_minute, rates.tokens_per_minute, schedule_ahead_s=1.0)
    if settings.redis_url is None:
        return LocalRateLimiter(limits)
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    return RedisRateLimiter(
        client, limits, key=limiter_key(settings.embedding_model, settings.provider_root())
    )


def build_runtime(
    settings: Settings, *, store: VectorStore | None = None, embedder: Embedder | None = None
) -> Runtime:
    spec = settings.model_spec()  # a configuration the model cannot serve stops here
    engine = engines.make_engine(settings.resolved_database_url())
    max_tokens = settings.chunk_max_tokens or chunking.default_max_tokens(spec.max_tokens_per_row)
    sessions = engines.make_sessionmaker(engine)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        budget_check=budget.pipeline_check(spec, settings),
        store=store or build_store(settings),
        embedder=embedder or build_embedder(settings),
        limiter=build_limiter(settings),
        spec=spec,
        process=f"{socket.gethostname()}:{os.getpid()}",
        chunk_max_tokens=min(max_tokens, spec.max_tokens_per_row),
    )
