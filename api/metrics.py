"""GET /metrics: Prometheus text format, computed from SQL at scrape time (so every process agrees)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import from_nano
from worker.ledger import budget
from worker.settings import Settings
from worker.ledger.counters import AVOIDED_PREFIX, EVENT_PREFIX
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
    out = Exposition()
    pr = ProviderRequest

    counters = dict(
        session.execute(
            sa.select(HourlyCounter.name, sa.func.sum(HourlyCounter.value)).group_by(HourlyCounter.name)
        ).all()
    )
    docs = documents.document_counts(session)
    outcomes = {
        name[len(EVENT_PREFIX) :]: int(v) for name, v in counters.items() if name.startswith(EVENT_PREFIX)
    }
    out.family("events_accepted_total", "counter", "Events whose desired state was recorded.")
    out.sample("events_accepted_total", outcomes.get("accepted", 0))
    out.family("events_rejected_total", "counter", "Events that broke the contract (kept with the reason).")
    out.sample("events_rejected_total", docs["rejected"])
    out.family("events_total", "counter", "Events by outcome: accepted, stale, duplicate, rejected.")
    for outcome in sorted({"accepted", "stale", "duplicate", *outcomes}):
        out.sample("events_total", outcomes.get(outcome, 0), outcome=outcome)
    out.sample("events_total", docs["rejected"], outcome="rejected")

    out.family("documents", "gauge", "Documents by status.")
    for status, n in docs.items():
        if status != "rejected":
            out.sample("documents", n, status=status)
    out.family("backlog_documents", "gauge", "Documents waiting to be embedded or deleted.")
    out.sample("backlog_documents", docs["pending"])
    age = documents.oldest_pending_age_s(session)
    out.family("oldest_pending_age_seconds", "gauge", "Age of the oldest pending document (0 when none).")
    out.sample("oldest_pending_age_seconds", round(age or 0.0, 3))

    per_model = session.execute(
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
    for model, status, n, *_ in per_model:
        out.sample("requests_total", n, model=model, status=status)
    totals: dict[str, list[int]] = {}
    for model, _status, _n, rows, tokens, nano, throttled in per_model:
        t = totals.setdefault(model, [0, 0, 0, 0])
        for i, v in enumerate((rows, tokens, nano, throttled)):
            t[i] += int(v or 0)
    for name, index, help_ in (
        ("rows_embedded_total", 0, "Rows (texts) embedded by succeeded requests."),
        ("tokens_total", 1, "Provider-billed tokens."),
        ("cost_cny_total", 2, "Cost in CNY at the model's real-time price."),
        ("provider_throttled_total", 3, "Provider answers with HTTP 429."),
    ):
        out.family(name, "counter", help_)
        for model, t in sorted(totals.items()):
            value = format(from_nano(t[2]), "f") if index == 2 else t[index]
            out.sample(name, value, model=model)

    out.family(
        "tokens_avoided_total", "counter", "Tokens not sent: dedup (cache, shared rows) and coalescing."
    )
    for kind in ("dedup", "coalesced"):
        out.sample("tokens_avoided_total", int(counters.get(f"{AVOIDED_PREFIX}{kind}", 0)), kind=kind)

    _latency(session, out)

    b = budget.budget_state(session, settings)
    out.family("budget_paused", "gauge", "1 when an overall spend cap is reached and embedding waits.")
    out.sample("budget_paused", b["paused"])
    out.family("budget_collection_paused", "gauge", "1 for a collection whose spend cap is reached.")
    for collection in b["paused_collections"]:
        out.sample("budget_collection_paused", 1, collection=collection)
    out.family("budget_waiting_documents", "gauge", "Pending documents last refused by a spend cap.")
    out.sample("budget_waiting_documents", b["waiting_documents"])
    out.family("budget_limit_cny", "gauge", "Spend cap in CNY for its window.")
    for cap in b["caps"]:
        out.sample(
            "budget_limit_cny", cap["limit_cny"], collection=cap["collection"] or "*", period=cap["period"]
        )
    out.family("budget_spent_cny", "gauge", "Spend counted against the cap in its current window.")
    for cap in b["caps"]:
        out.sample(
            "budget_spent_cny", cap["spent_cny"], collection=cap["collection"] or "*", period=cap["period"]
        )
    return out.text()


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
        for bound, n in zip(LATENCY_BUCKETS_S, cumulative):
            out.sample("provider_latency_seconds_bucket", int(n or 0), model=model, le=f"{bound:g}")
        out.sample("provider_latency_seconds_bucket", count, model=model, le="+Inf")
        out.sample("provider_latency_seconds_sum", round((total_ms or 0.0) / 1000, 6), model=model)
        out.sample("provider_latency_seconds_count", count, model=model)
