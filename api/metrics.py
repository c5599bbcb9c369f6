"""GET /metrics: Prometheus text format, computed from SQL at scrape time (so every process agrees).

A scrape costs O(roll-up rows), never O(ledger rows): provider requests come from the totals the
database keeps beside the ledger (worker/ledger/rollups.py), events and tokens avoided from the
hourly counters (worker/ledger/counters.py). Documents are counted by status (an index); the
budget gauges, with caps set, sum their window's spend (worker/ledger/budget.py).
Names follow Prometheus conventions: base units (`_seconds`), `_total` for counters.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.capture import exposition as capture
from worker.catalog import cny_str
from worker.ledger import budget, rollups
from worker.ledger.counters import AVOIDED_PREFIX, EVENT_PREFIX
from worker.settings import Settings
from worker.sql import documents, pauses
from worker.sql.models import HourlyCounter

LATENCY_BUCKETS_S = rollups.LATENCY_BUCKETS_S
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
    """Every metric family, from the SQL state now. Folds the ledger's pending roll-up deltas
    first (PostgreSQL, in a transaction of its own), so they stay few."""
    rollups.fold_apart(session)
    out = Exposition()
    counters = dict(
        session.execute(
            sa.select(HourlyCounter.name, sa.func.sum(HourlyCounter.value)).group_by(HourlyCounter.name)
        ).all()
    )
    docs = documents.document_counts(session)
    _events(out, counters, rejected=docs["rejected"])
    _documents(session, out, docs)
    totals = rollups.request_totals(session)
    _requests(out, totals)
    _avoided(out, counters)
    _latency(out, totals)
    _budget(out, budget.budget_state(session, settings))
    out.family("provider_paused", "gauge", "1 while an account-level provider error pauses embedding.")
    out.sample("provider_paused", pauses.active(session) is not None)
    capture.write_metrics(out, session)  # sidecar_source_*: change capture (worker/capture/)
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


def _requests(out: Exposition, totals: dict[str, rollups.ModelTotals]) -> None:
    out.family(
        "provider_requests_total", "counter", "Finished provider requests by model, lane and ledger status."
    )
    out.family("provider_requests_in_flight", "gauge", "Provider requests sent and not finished yet.")
    for model, t in totals.items():
        for (lane, status), n in sorted(t.requests.items()):
            if status in rollups.TERMINAL:
                out.sample("provider_requests_total", n, model=model, lane=lane, status=status)
        for lane in sorted({lane for lane, _ in t.requests}):
            n = t.requests.get((lane, "sent"), 0)
            out.sample("provider_requests_in_flight", n, model=model, lane=lane)
    for name, help_, value in (
        ("rows_embedded_total", "Rows (texts) embedded by succeeded requests.", "rows_embedded"),
        (
            "tokens_total",
            "Provider-billed tokens (estimates for requests of unknown outcome).",
            "billed_tokens",
        ),
        ("cost_cny_total", "Cost in CNY at the model's price (estimates for unknown outcomes).", "cost"),
        ("provider_throttled_total", "Provider answers with HTTP 429.", "throttled"),
    ):
        out.family(name, "counter", help_)
        for model, t in totals.items():
            v = cny_str(t.cost_nano_cny) if value == "cost" else getattr(t, value)
            out.sample(name, v, model=model)


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


def _latency(out: Exposition, totals: dict[str, rollups.ModelTotals]) -> None:
    out.family("provider_latency_seconds", "histogram", "Provider request latency.")
    for model, t in totals.items():
        if not t.latency_count:
            continue
        for le, n in t.cumulative_latency():
            out.sample("provider_latency_seconds_bucket", n, model=model, le=le)
        out.sample("provider_latency_seconds_sum", round(t.latency_ms_sum / 1000, 6), model=model)
        out.sample("provider_latency_seconds_count", t.latency_count, model=model)
