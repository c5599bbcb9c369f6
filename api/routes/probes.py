"""Probes and metrics: GET /healthz, GET /readyz, GET /metrics.

/readyz tells every caller whether the API is ready (`{"ready": true|false}`, 200 or 503). A caller
with a token also gets each check and the reasons, as short categories ("broker unreachable",
"schema behind", ...; a reached overall budget cap says its spend and when it resets): never an
exception's text, a URL, a host or a path. A failed check logs the exception's type only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from api import deps, metrics
from api.auth import Role, can_read, role_or_none
from api.deps import session
from worker.capture import exposition as capture
from worker.errors import SchemaOutdated
from worker.ledger import budget
from worker.settings import Settings
from worker.sql import pauses, schema

log = logging.getLogger(__name__)
router = APIRouter()
PROBE_TIMEOUT_S = 3.0


@router.get("/healthz", summary="Alive")
def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready: broker, SQL and Qdrant reachable, embedding not paused",
    responses={503: {"description": "not ready; with a token, `reasons` says why"}},
)
def readyz(
    request: Request,
    role: Role | None = Depends(role_or_none),
    settings: Settings = Depends(deps.settings),
) -> JSONResponse:
    """`{"ready"}` for anyone; with a read or write token also `checks` and `reasons`."""
    state = request.app.state
    checks, reasons = readiness(state.engine, state.sessions, state.celery, settings)
    body: dict[str, Any] = {"ready": not reasons}
    if role is not None:
        body |= {"reasons": reasons, "checks": checks}
    return JSONResponse(body, status_code=200 if not reasons else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(can_read)],
    summary="Prometheus metrics (sidecar_ prefix)",
)
def get_metrics(
    settings: Settings = Depends(deps.settings), s: Session = Depends(session)
) -> PlainTextResponse:
    return PlainTextResponse(metrics.render(s, settings), media_type=metrics.CONTENT_TYPE)


def readiness(
    engine: Engine, sessions: sessionmaker[Session], celery: Any, settings: Settings
) -> tuple[dict[str, Any], list[str]]:
    """Each check as {"ok", "detail"}, and the reasons the API is not ready (none: ready)."""
    checks = {
        "sql": check("sql", lambda: sql_probe(engine)),
        "broker": check("broker", lambda: broker_probe(celery), failure="broker unreachable"),
        "qdrant": check("qdrant", lambda: qdrant_probe(settings), failure="vector store unreachable"),
    }
    if checks["sql"]["ok"]:
        checks["budget"] = check("budget", lambda: budget_probe(sessions, settings))
        checks["provider"] = check("provider", lambda: provider_probe(sessions))
        checks["sources"] = check("sources", lambda: sources_probe(sessions, settings))
    reasons = [r for c in checks.values() if not c["ok"] for r in c.pop("reasons", [c["detail"]])]
    return checks, reasons


class NotReady(Exception):
    """A probe's finding that the API is not ready: `category` says what, `reasons` explain it."""

    def __init__(self, category: str, reasons: list[str]) -> None:
        super().__init__(category)
        self.category = category
        self.reasons = reasons


def check(name: str, probe: Callable[[], str], failure: str = "SQL unreachable") -> dict[str, Any]:
    """{"ok", "detail"}: the probe's answer, or a category when it fails (only the type is logged)."""
    try:
        return {"ok": True, "detail": probe()}
    except NotReady as exc:
        return {"ok": False, "detail": exc.category, "reasons": exc.reasons}
    except SchemaOutdated:
        log.warning("readyz.failed check=%s error=SchemaOutdated", name)
        return {"ok": False, "detail": "schema behind"}
    except Exception as exc:  # a probe's failure is the answer, not an error
        log.warning("readyz.failed check=%s error=%s", name, type(exc).__name__)
        return {"ok": False, "detail": failure}


def sql_probe(engine: Engine) -> str:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    schema.check_schema(engine)
    return "reachable, schema current"


def broker_probe(celery: Any) -> str:
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=PROBE_TIMEOUT_S)
    return "reachable"


def qdrant_probe(settings: Settings) -> str:
    if not settings.qdrant_url:
        kind = "local mode" if settings.resolved_qdrant_path() is not None else "Qdrant Edge"
        return f"embedded, {kind} (opened by the worker only)"
    key = settings.qdrant_api_key
    headers = {"api-key": key.get_secret_value()} if key else {}
    url = f"{settings.qdrant_url.rstrip('/')}/readyz"
    httpx.get(url, headers=headers, timeout=PROBE_TIMEOUT_S).raise_for_status()
    return "reachable"


def budget_probe(sessions: sessionmaker[Session], settings: Settings) -> str:
    """Not ready when an overall cap is reached (a collection's cap pauses only that collection)."""
    with sessions() as s:
        state = budget.budget_state(s, settings)
    if state["paused"]:
        overall = [f"budget: {r}" for r in state["reasons"] if "all collections" in r]
        raise NotReady("budget paused", overall or ["budget paused"])
    if state["paused_collections"]:
        return f"within every overall cap; {len(state['paused_collections'])} collection(s) paused"
    return "within every cap"


def provider_probe(sessions: sessionmaker[Session]) -> str:
    """Not ready while an account-level provider error pauses embedding."""
    with sessions() as s:
        paused = [p for p in pauses.current(s) if p["state"] == "paused"]
    if paused:
        raise NotReady("provider paused", [f"provider paused until {p['until']}" for p in paused])
    return "not paused"


def sources_probe(sessions: sessionmaker[Session], settings: Settings) -> str:
    """Not ready while a change-capture source is down, or behind by more than its thresholds."""
    with sessions() as s:
        reasons = capture.not_ready(s, settings)
    if reasons:
        raise NotReady("source lagging", reasons)
    return "every source keeping up"
