"""Wiring: the one place that picks an implementation for each seam from the settings.

Built after fork (Celery's worker_process_init) or on first use, never at import time.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker import catalog, chunking
from worker.embedding.base import Embedder
from worker.groupcommit import GroupCommit
from worker.ledger import budget
from worker.limiter.base import Limits, RateLimiter
from worker.limiter.local import LocalRateLimiter
from worker.limiter.redis import RedisRateLimiter, limiter_key
from worker.settings import Settings
from worker.sql import cache, engines
from worker.vectorstore.base import SerializedStore, VectorStore
from worker.vectorstore.edge import EdgeStore
from worker.vectorstore.qdrant import QdrantStore

# Called with (session, collections, est_tokens) in the transaction of each ledger intent row;
# raises BudgetExceeded (a RetryLater) to hold the call back.
BudgetCheck = Callable[[Session, set[str], int], None]


class Faults:
    """The pipeline's named points where a test makes it fail, as if the process died there.

    Nothing is armed in production, so `reach` does nothing.
    """

    POINTS = ("before_call", "after_call", "after_ledger", "after_store_write")

    def __init__(self) -> None:
        self._armed: dict[str, BaseException] = {}

    def arm(self, point: str, error: BaseException) -> None:
        """Raise `error` each time the pipeline reaches `point`, until `disarm`."""
        if point not in self.POINTS:
            raise ValueError(f"no fault point {point!r}; the points are {', '.join(self.POINTS)}")
        self._armed[point] = error

    def disarm(self) -> None:
        self._armed.clear()

    def reach(self, point: str) -> None:
        if (error := self._armed.get(point)) is not None:
            raise error


T = TypeVar("T")


class CallPool:
    """Threads that carry a cycle's provider calls beyond the one on its own thread
    (worker/calls.py, `request_concurrency`); shared by a process's embedding loops, started
    on first use, a thread at a time as calls need them."""

    MAX_THREADS = 32

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.MAX_THREADS, thread_name_prefix="sidecar-call")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class Runtime:
    """One process's parts, built once by `build_runtime` and shared by its threads."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: VectorStore
    embedder: Embedder
    limiter: RateLimiter
    spec: catalog.ModelSpec
    process: str  # host:pid
    chunk_max_tokens: int
    budget_check: BudgetCheck | None = None
    # Set when work is committed (an ingest, a reconciler repair): wakes the embedding threads.
    wake: threading.Event = field(default_factory=threading.Event)
    faults: Faults = field(default_factory=Faults)
    # Messages that concurrent ingest tasks record at once share a transaction (worker/intake.py).
    intake: GroupCommit[Any, Any] = field(default_factory=GroupCommit)
    # A cycle's concurrent provider calls (worker/calls.py).
    calls: CallPool = field(default_factory=CallPool)
    # Runtimes of other models and the collection routes, built on first use (worker/reembed/);
    # shared by every runtime derived from this one.
    variants: dict[Any, Any] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        """The lease owner: this thread of this process, so threads never act on each other's leases."""
        return f"{self.process}:{threading.get_ident()}"

    def cache_key(self, content_hash: str) -> str:
        return cache.cache_key(
            self.embedder.model, self.embedder.dimensions, content_hash, sparse=self.settings.sparse_vectors
        )

    def close(self) -> None:
        """Close every part, even when one of them fails to (the store unlocks its files)."""
        self.calls.close()
        try:
            for variant in list(self.variants.values()):  # other models' embedders
                if isinstance(variant, Runtime) and variant.embedder is not self.embedder:
                    variant.embedder.close()
            self.embedder.close()
        finally:
            try:
                self.store.close()
            finally:
                self.engine.dispose()


def build_store(settings: Settings) -> VectorStore:
    """A Qdrant server (SIDECAR_QDRANT_URL), shared and thread-safe; else local mode when
    SIDECAR_QDRANT_PATH is set, one call at a time; else the default, Qdrant Edge in-process."""
    if settings.qdrant_url:
        return QdrantStore.from_settings(settings)
    if settings.resolved_qdrant_path() is not None:
        return SerializedStore(QdrantStore.from_settings(settings))
    return EdgeStore.from_settings(settings)


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
    """Everything a process needs, or nothing: a part that fails to build closes the ones built
    before it (an embedded store would otherwise stay locked by this very process)."""
    spec = settings.model_spec()  # a configuration the model cannot serve stops here
    with ExitStack() as built:
        engine = engines.make_engine(settings.resolved_database_url())
        built.callback(engine.dispose)
        if store is None:
            store = build_store(settings)
            built.callback(store.close)
        if embedder is None:
            embedder = build_embedder(settings)
            built.callback(embedder.close)
        runtime = Runtime(
            settings=settings,
            engine=engine,
            sessions=engines.make_sessionmaker(engine),
            budget_check=budget.pipeline_check(spec, settings),
            store=store,
            embedder=embedder,
            limiter=build_limiter(settings),
            spec=spec,
            process=f"{socket.gethostname()}:{os.getpid()}",
            chunk_max_tokens=chunking.token_limit(settings.chunk_max_tokens, spec.max_tokens_per_row),
            # a group waits for as many messages as the pool runs at once (worker/groupcommit.py)
            intake=GroupCommit(gather=settings.worker_concurrency, gather_s=settings.ingest_gather_s),
        )
        built.pop_all()  # built whole: the runtime's close() owns the parts now
    return runtime
