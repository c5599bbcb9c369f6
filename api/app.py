"""The HTTP API (FastAPI): events in; documents, ledger, spend, budget and dead letters out; probes.

    POST /v1/events                     write token   one event or a list → 202, handed to the worker
    GET  /v1/documents/{coll}/{doc_id}  read token    a document's state
    GET  /v1/requests                   read token    the ledger, filtered, cursor-paginated
    GET  /v1/spend                      read token    tokens, requests, cost by hour|day|model|lane|…
    GET  /v1/search                     read token    the chunks nearest to a text (worker/search.py)
    GET  /v1/budget, PUT|DELETE /v1/budget/caps        caps and pauses (changing them: write token)
    GET  /v1/deadletters, POST …/{id}/retry            dead letters
    GET  /healthz, /readyz              open          alive; ready (a token also sees why not)
    GET  /metrics                       read token    Prometheus text, from SQL at scrape time
    GET  /v1/sources                    read token    change-capture sources: position, lag, errors
    GET  /v1/status, /v1/activity       read token    `sidecar status --json`; backlog and throughput
    GET  /console                       sign-in       the web console (api/console/): a cookie-held token

Every request body is capped (SIDECAR_API_MAX_BODY_BYTES) before auth or any read. Engines and
the Celery app are built in the lifespan, never at import time. Search needs the vector store:
`create_app(settings, runtime=rt)` searches the runtime's (`sidecar serve` passes the worker's);
without one the app builds its own runtime when SIDECAR_QDRANT_URL names a shared server, and
otherwise answers 503 (the embedded store belongs to the worker's process).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.console import router as console
from api.console.session import ConsoleCookieAuth
from api.middleware import BodySizeLimit
from api.routes import console_data, events, probes, search, sources, spend
from worker import search as searching
from worker.errors import SidecarError
from worker.runtime import Runtime, build_runtime
from worker.settings import Settings
from worker.sql import engines
from worker.tasks import create_celery

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Events in; document state, the spend ledger, spend and budgets out. Bearer tokens: "
    "SIDECAR_API_TOKENS read and write, SIDECAR_API_READ_TOKENS only read."
)


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """The API for `settings` (the process's one Settings object); searches through `runtime`
    (left open: its owner closes it) when given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(app, settings), searching_with(app, settings, runtime):
            yield

    app = FastAPI(title="vector-sidecar", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(ConsoleCookieAuth)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.api_max_body_bytes)
    for module in (events, spend, probes, console_data, console, sources):
        app.include_router(module.router)
    # Documented only where it can answer: without a runtime or a Qdrant server it answers 503.
    app.include_router(search.router, include_in_schema=runtime is not None or bool(settings.qdrant_url))
    return app


@asynccontextmanager
async def serving(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """The SQL engine, sessions and Celery app on `app.state` while the API serves."""
    engine = engines.make_engine(settings.resolved_database_url())
    app.state.engine = engine
    app.state.sessions = engines.make_sessionmaker(engine)
    app.state.celery = create_celery(settings)
    if not (settings.api_tokens or settings.api_read_tokens):
        log.warning("api.no_tokens every call but the probes answers 401; set SIDECAR_API_TOKENS")
    try:
        yield
    finally:
        app.state.celery.close()
        engine.dispose()


@asynccontextmanager
async def searching_with(app: FastAPI, settings: Settings, runtime: Runtime | None) -> AsyncIterator[None]:
    """`app.state.searcher`: over `runtime`, or over a runtime of our own on a Qdrant server
    (closed on shutdown); else None, with the reason in `app.state.search_unavailable`."""
    app.state.searcher, app.state.search_unavailable = None, None
    own = None
    if runtime is None and settings.qdrant_url:
        try:
            own = runtime = build_runtime(settings)
        except SidecarError as exc:
            log.warning("api.search_unavailable error=%s", type(exc).__name__)
            app.state.search_unavailable = f"{type(exc).__name__}: {exc}"
    if runtime is not None:
        app.state.searcher = searching.Searcher(runtime)
    try:
        yield
    finally:
        app.state.searcher = None
        if own is not None:
            own.close()
