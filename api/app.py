"""The HTTP API (FastAPI): events in; documents, ledger, spend, budget and dead letters out; probes.

    POST /v1/events                     write token   one event or a list → 202, handed to the worker
    GET  /v1/documents/{coll}/{doc_id}  read token    a document's state
    GET  /v1/requests                   read token    the ledger, filtered, cursor-paginated
    GET  /v1/spend                      read token    tokens, requests, cost by hour|day|model|…
    GET  /v1/budget, PUT|DELETE /v1/budget/caps        caps and pauses (changing them: write token)
    GET  /v1/deadletters, POST …/{id}/retry            dead letters
    GET  /healthz, /readyz              open          alive; ready (a token also sees why not)
    GET  /metrics                       read token    Prometheus text, from SQL at scrape time

Every request body is capped (SIDECAR_API_MAX_BODY_BYTES) before auth or any read. Engines and
the Celery app are built in the lifespan, never at import time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.middleware import BodySizeLimit
from api.routes import events, probes, spend
from worker.settings import Settings
from worker.sql import engines
from worker.tasks import create_celery

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Events in; document state, the spend ledger, spend and budgets out. Bearer tokens: "
    "SIDECAR_API_TOKENS read and write, SIDECAR_API_READ_TOKENS only read."
)


def create_app(settings: Settings) -> FastAPI:
    """The API for `settings` (the process's one Settings object)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(app, settings):
            yield

    app = FastAPI(title="vector-sidecar", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.api_max_body_bytes)
    for module in (events, spend, probes):
        app.include_router(module.router)
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
