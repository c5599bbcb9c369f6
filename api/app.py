"""The HTTP API (FastAPI): events in; documents, ledger, spend, budget and dead letters out; probes.

    POST /v1/events                     write token   one event or a list → 202, handed to the worker
    GET  /v1/documents/{coll}/{doc_id}  read token    a document's state
    GET  /v1/requests                   read token    the ledger, filtered, cursor-paginated
    GET  /v1/spend                      read token    tokens, requests, cost by hour|day|model|collection|tenant
    GET  /v1/budget, PUT|DELETE /v1/budget/caps        caps and pauses (changing them: write token)
    GET  /v1/deadletters, POST …/{id}/retry            dead letters
    GET  /healthz, /readyz              open          alive; broker, SQL, Qdrant reachable and not paused
    GET  /metrics                       read token    Prometheus text, from SQL at scrape time

Engines and the Celery app are built in the lifespan, never at import time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.orm import Session

from api import metrics
from api.auth import can_read
from api.deps import session
from api.routes import events, spend
from worker.ledger import budget
from worker.settings import Settings
from worker.sql import engines, pauses, schema

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from worker.tasks import create_celery

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

    app = FastAPI(
        title="vector-sidecar",
        version="0.1.0",
        description="Events in; document state, the spend ledger, spend and budgets out. Bearer tokens: "
        "SIDECAR_API_TOKENS read and write, SIDECAR_API_READ_TOKENS only read.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(events.router)
    app.include_router(spend.router)

    @app.get("/healthz", summary="Alive")
    def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Ready: broker, SQL and Qdrant reachable, embedding not paused",
        responses={503: {"description": "not ready; `reasons` says why"}},
    )
    def readyz(request: Request) -> JSONResponse:
        checks, reasons = readiness(request.app)
        body = {"ready": not reasons, "reasons": reasons, "checks": checks}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=[Depends(can_read)],
        summary="Prometheus metrics (sidecar_ prefix)",
    )
    def get_metrics(request: Request, s: Session = Depends(session)) -> PlainTextResponse:
        text = metrics.render(s, request.app.state.settings)
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    return app


def readiness(app: FastAPI) -> tuple[dict[str, Any], list[str]]:
    """Each check as {"ok", "detail"}; the reasons of the failed ones."""
    settings: Settings = app.state.settings
    checks: dict[str, Any] = {}

    def check(name: str, probe: Any) -> None:
        try:
            checks[name] = {"ok": True, "detail": probe()}
        except Exception as exc:  # a probe's failure is the answer, not an error
            checks[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:500]}

    def sql() -> str:
        with app.state.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        schema.check_schema(app.state.engine)
        return "reachable, schema current"

    def broker() -> str:
        with app.state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        return "reachable"

    def qdrant() -> str:
        if not settings.qdrant_url:
            return f"local mode at {settings.resolved_qdrant_path()} (opened by the worker only)"
        headers = {"api-key": settings.qdrant_api_key.get_secret_value()} if settings.qdrant_api_key else {}
        httpx.get(
            f"{settings.qdrant_url.rstrip('/')}/readyz", headers=headers, timeout=3.0
        ).raise_for_status()
        return "reachable"

    check("sql", sql)
    check("broker", broker)
    check("qdrant", qdrant)
    reasons = [f"{name}: {c['detail']}" for name, c in checks.items() if not c["ok"]]
    if checks["sql"]["ok"]:
        with app.state.sessions() as s:
            state = budget.budget_state(s, app.state.settings)
        checks["budget"] = {
            "ok": not state["paused"],
            "detail": state["reasons"] or "within every cap",
            "paused_collections": state["paused_collections"],
        }
        if state["paused"]:
            reasons += [f"budget: {r}" for r in state["reasons"] if "all collections" in r]
        with app.state.sessions() as s:
            paused = [p for p in pauses.current(s) if p["state"] == "paused"]
        checks["provider"] = {"ok": not paused, "detail": [p["reason"] for p in paused] or "not paused"}
        reasons += [f"provider: {p['reason']} (until {p['until']})" for p in paused]
    return checks, reasons
