"""GET /metrics: Prometheus text format, computed from SQL at scrape time (so every process agrees)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import cny_str
from worker.ledger import budget
from worker.ledger.counters import AVOIDED_PREFIX, EVENT_PREFIX
from worker.settings import Settings
from worker.sql import documents
from worker.sql.models import HourlyCounter, ProviderRequest

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP sidecar_{name} {help_}", f"# TYPE sidecar_{name} {kind}"]

    def sample(self, name: str, value: Any, **labels: Any) -> None:
        text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        self.lines.append(
            f"sidecar_{name}{{{text}}} {_number(value)}" if text else f"sidecar_{name} {_number(value)}"
        )

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def render(session: Session, settings: Settings) -> str:
    """Every metric family, from the SQL state now."""
    out = Exposition()
    counters = dict(
        session.execute(
            sa.select(HourlyCounter.name, sa.func.sum(HourlyCounter.value)).group_by(HourlyCounter.name)
        ).all()
    )
    docs = documents.document_counts(session)
    _events(out, counters, rejected=docs["rejected"])
    _documents(session, out, docs)
    _requests(session, out)
    _avoided(out, counters)
    _latency(session, out)
    _budget(out, budget.budget_state(session, settings))
    return out.text()


def _events(out: Exposition, counters: dict[str, Any], *, rejected: int) -> None:
    outcomes = {
        name[len(EVENT_PREFIX) :]: int(v) for name, v in counters.items() if name.startswith(EVENT_PREFIX)
    }
    out.family("events_accepted_total", "counter", "Events whose desired state was recorded.")
    out.sample("events_accepted_total", outcomes.get("accepted", 0))
    out.family("events_rejected_total", "counter", "Events that broke the contract (kept with the reason).")
    out.sample("events_rejected_total", rejected)
    out.family("events_total", "counter", "Events by outcome: accepted, stale, duplicate, rejected.")
    for outcome in sorted({"accepted", "stale", "duplicate", *outcomes}):
        out.sample("events_total", outcomes.get(outcome, 0), outcome=outcome)
    out.sample("events_total", rejected, outcome="rejected")


def _documents(session: Session, out: Exposition, docs: dict[str, int]) -> None:
    out.family("documents", "gauge", "Documents by status.")
    for status, n in docs.items():
        if status != "rejected":
            out.sample("documents", n, status=status)
    out.family("backlog_documents", "gauge", "Documents waiting to be embedded or deleted.")
    out.sample("backlog_documents", docs["pending"])
    age = documents.oldest_pending_age_s(session)
    out.family("oldest_pending_age_seconds", "gauge", "Age of the oldest pending document (0 when none).")
    out.sample("oldest_pending_age_seconds", round(age or 0.0, 3))


_PER_MODEL = (  # (family, help); the sums of `_requests`'s query in this order
    ("rows_embedded_total", "Rows (texts) embedded by succeeded requests."),
    ("tokens_total", "Provider-billed tokens."),
    ("cost_cny_total", "Cost in CNY at the model's real-time price."),
    ("provider_throttled_total", "Provider answers with HTTP 429."),
)


def _requests(session: Session, out: Exposition) -> None:
    pr = ProviderRequest
    per_status = session.execute(
        sa.select(
            pr.model,
            pr.status,
            sa.func.count(),
            sa.func.sum(sa.case((pr.status == "succeeded", pr.rows), else_=0)),
            sa.func.sum(sa.func.coalesce(pr.billed_tokens, 0)),
            sa.func.sum(sa.func.coalesce(pr.cost_nano_cny, 0)),
            sa.func.sum(sa.case((pr.http_status == 429, 1), else_=0)),
        )
        .group_by(pr.model, pr.status)
        .order_by(pr.model, pr.status)
    ).all()
    out.family("requests_total", "counter", "Provider requests by model and ledger status.")
    totals: dict[str, list[int]] = {}
    for model, status, n, *sums in per_status:
        out.sample("requests_total", n, model=model, status=status)
        model_totals = totals.setdefault(model, [0] * len(_PER_MODEL))
        for i, value in enumerate(sums):
            model_totals[i] += int(value or 0)
    for i, (name, help_) in enumerate(_PER_MODEL):
        out.family(name, "counter", help_)
        for model, sums in sorted(totals.items()):
            out.sample(name, cny_str(sums[i]) if name == "cost_cny_total" else sums[i], model=model)


def _avoided(out: Exposition, counters: dict[str, Any]) -> None:
    out.family(
        "tokens_avoided_total", "counter", "Tokens not sent: dedup (cache, shared rows) and coalescing."
    )
    for kind in ("dedup", "coalesced"):
        out.sample("tokens_avoided_total", int(counters.get(f"{AVOIDED_PREFIX}{kind}", 0)), kind=kind)


def _budget(out: Exposition, state: dict[str, Any]) -> None:
    out.family("budget_paused", "gauge", "1 when an overall spend cap is reached and embedding waits.")
    out.sample("budget_paused", state["paused"])
    out.family("budget_collection_paused", "gauge", "1 for a collection whose spend cap is reached.")
    for collection in state["paused_collections"]:
        out.sample("budget_collection_paused", 1, collection=collection)
    out.family("budget_waiting_documents", "gauge", "Pending documents last refused by a spend cap.")
    out.sample("budget_waiting_documents", state["waiting_documents"])
    for name, key, help_ in (
        ("budget_limit_cny", "limit_cny", "Spend cap in CNY for its window."),
        ("budget_spent_cny", "spent_cny", "Spend counted against the cap in its current window."),
    ):
        out.family(name, "gauge", help_)
        for cap in state["caps"]:
            out.sample(name, cap[key], collection=cap["collection"] or "*", period=cap["period"])


def _latency(session: Session, out: Exposition) -> None:
    pr = ProviderRequest
    columns = [sa.func.sum(sa.case((pr.latency_ms <= b * 1000, 1), else_=0)) for b in LATENCY_BUCKETS_S]
    rows = session.execute(
        sa.select(pr.model, sa.func.count(), sa.func.sum(pr.latency_ms), *columns)
        .where(pr.latency_ms.is_not(None))
        .group_by(pr.model)
        .order_by(pr.model)
    ).all()
    out.family("provider_latency_seconds", "histogram", "Provider request latency.")
    for model, count, total_ms, *cumulative in rows:
        for bound, n in zip(LATENCY_BUCKETS_S, cumulative, strict=True):
            out.sample("provider_latency_seconds_bucket", int(n or 0), model=model, le=f"{bound:g}")
        out.sample("provider_latency_seconds_bucket", count, model=model, le="+Inf")
        out.sample("provider_latency_seconds_sum", round((total_ms or 0.0) / 1000, 6), model=model)
        out.sample("provider_latency_seconds_count", count, model=model)
