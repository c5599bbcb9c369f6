"""Reconcile the ledger with the provider's bill: every charged request, once, at its billed tokens.

Batch jobs are billed line by line (entries with `batch_id`); they are summed per job first and
matched to the job's one ledger row by the job's id (`by_batch_job`), at the batch price.

The bill is a list of charged requests `{request_id, model, tokens, at}` (the emulator's
`GET /_emulator/bill`; a provider usage export mapped to that shape). Most ledger rows carry
the provider's request id and match by it. Rows of unknown outcome (a timeout, a malformed
answer, a worker killed mid-call) have no id; a bill entry left over is matched to such a row of
the same model whose estimate is closest to the billed tokens (within 10%) and whose call began
shortly before the charge. With `apply`, matched unknown rows take the bill's request id and
tokens, and unknown rows no bill entry claims are closed at 0 tokens (the provider never charged
them), so the ledger's billed tokens then equal the bill's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import MODELS
from worker.sql.models import ProviderRequest

ESTIMATE_TOLERANCE = 0.10  # a provider may count a little differently from the Qwen BPE estimate
CLOCK_SKEW = dt.timedelta(seconds=5)  # the bill's clock against ours


@dataclass
class BillReport:
    bill_requests: int = 0
    bill_tokens: int = 0
    ledger_tokens: int = 0  # over the bill's time range, before any change
    matched_by_id: int = 0
    matched_by_estimate: list[tuple[str, str]] = field(default_factory=list)  # (ledger id, bill id)
    token_mismatches: list[dict[str, Any]] = field(default_factory=list)
    missing_from_ledger: list[dict[str, Any]] = field(default_factory=list)
    not_on_bill: list[str] = field(default_factory=list)  # succeeded ledger ids the bill lacks
    unknown_not_billed: list[str] = field(default_factory=list)
    applied: bool = False

    @property
    def balanced(self) -> bool:
        """Every bill entry in the ledger once by its id, at its tokens, and nothing else billed."""
        return not (
            self.token_mismatches
            or self.missing_from_ledger
            or self.not_on_bill
            or self.matched_by_estimate
            or self.unknown_not_billed
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "balanced": self.balanced,
            "applied": self.applied,
            "bill_requests": self.bill_requests,
            "bill_tokens": self.bill_tokens,
            "ledger_tokens": self.ledger_tokens,
            "matched_by_id": self.matched_by_id,
            "matched_by_estimate": len(self.matched_by_estimate),
            "unknown_not_billed": len(self.unknown_not_billed),
            "token_mismatches": self.token_mismatches,
            "missing_from_ledger": self.missing_from_ledger,
            "not_on_bill": self.not_on_bill,
        }


def reconcile(
    session: Session, bill: list[dict[str, Any]], *, window_s: float = 600.0, apply: bool = False
) -> BillReport:
    report = BillReport(bill_requests=len(bill), bill_tokens=sum(int(b["tokens"]) for b in bill))
    if not bill:
        return report
    bill = by_batch_job(bill)
    rows = _ledger_rows(session, bill, window_s)
    report.ledger_tokens = sum(r.billed_tokens or 0 for r in rows)
    by_provider_id = {r.provider_request_id: r for r in rows if r.provider_request_id}
    # Unknown rows still open: no provider id, and not already closed at 0 by an earlier run.
    unknown = sorted(
        (r for r in rows if r.status == "unknown" and not r.provider_request_id and r.billed_tokens != 0),
        key=lambda r: r.created_at,
    )
    claimed: set[str] = set()
    for entry in sorted(bill, key=lambda b: float(b["at"])):
        row = by_provider_id.get(entry["request_id"])
        if row is not None:
            _matched_by_id(report, entry, row, apply=apply)
            claimed.add(row.id)
        else:
            _match_by_estimate(report, entry, unknown, claimed, window_s=window_s, apply=apply)
    billed_ids = {b["request_id"] for b in bill}
    report.not_on_bill = [
        r.id
        for r in rows
        if r.status == "succeeded" and r.provider_request_id and r.provider_request_id not in billed_ids
    ]
    report.unknown_not_billed = [r.id for r in unknown if r.id not in claimed]
    if apply:
        for row in unknown:
            if row.id not in claimed:
                _take_bill(row, 0, "[not on the provider's bill]")
        report.applied = True
    return report


def by_batch_job(bill: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bill with the charged lines of each batch job (entries carrying `batch_id`) summed into
    one entry under the job's id, as the ledger keeps one row per job (lane `batch`; each line's
    request id is in `batch_lines`). Real-time entries pass through unchanged."""
    jobs: dict[str, dict[str, Any]] = {}
    out = []
    for entry in bill:
        batch_id = entry.get("batch_id")
        if not batch_id:
            out.append(entry)
            continue
        job = jobs.get(batch_id)
        if job is None:
            job = jobs[batch_id] = {**entry, "request_id": batch_id, "tokens": 0, "lines": 0}
            out.append(job)
        job["tokens"] += int(entry["tokens"])
        job["lines"] += 1
        job["at"] = max(float(job["at"]), float(entry["at"]))
    return out


def _ledger_rows(session: Session, bill: list[dict[str, Any]], window_s: float) -> list[ProviderRequest]:
    """Ledger rows over the bill's time range, `window_s` wider on each side, and the rows of the
    bill's batch jobs (created up to the job's completion window before their charges)."""
    ats = [float(b["at"]) for b in bill]
    since = dt.datetime.fromtimestamp(min(ats) - window_s, dt.UTC)
    until = dt.datetime.fromtimestamp(max(ats) + window_s, dt.UTC)
    batch_ids = [b["request_id"] for b in bill if b.get("batch_id")]
    in_range = ProviderRequest.created_at.between(since, until)
    where = sa.or_(in_range, ProviderRequest.provider_request_id.in_(batch_ids)) if batch_ids else in_range
    query = sa.select(ProviderRequest).where(where)
    return list(session.execute(query).scalars())


def _matched_by_id(report: BillReport, entry: dict[str, Any], row: ProviderRequest, *, apply: bool) -> None:
    report.matched_by_id += 1
    tokens = int(entry["tokens"])
    if row.billed_tokens == tokens:
        return
    if apply and row.status == "unknown":  # booked at its estimate: the bill knows better
        _take_bill(row, tokens, "[billed tokens from the bill]")
    else:
        report.token_mismatches.append(
            {"request_id": entry["request_id"], "bill": tokens, "ledger": row.billed_tokens}
        )


def _match_by_estimate(
    report: BillReport,
    entry: dict[str, Any],
    unknown: list[ProviderRequest],
    claimed: set[str],
    *,
    window_s: float,
    apply: bool,
) -> None:
    """A bill entry no row carries: the unknown row of the same model with the closest estimate."""
    tokens = int(entry["tokens"])
    at = dt.datetime.fromtimestamp(float(entry["at"]), dt.UTC)
    candidates = [
        r
        for r in unknown
        if r.id not in claimed
        and r.model == entry["model"]
        and abs(r.est_tokens - tokens) <= ESTIMATE_TOLERANCE * max(tokens, 1)
        and r.created_at - CLOCK_SKEW <= at <= r.created_at + dt.timedelta(seconds=window_s)
    ]
    # The closest estimate, then the call that began nearest before the charge.
    match = min(
        candidates,
        key=lambda r: (abs(r.est_tokens - tokens), abs((at - r.created_at).total_seconds())),
        default=None,
    )
    if match is None:
        report.missing_from_ledger.append(entry)
        return
    claimed.add(match.id)
    report.matched_by_estimate.append((match.id, entry["request_id"]))
    if apply:
        match.provider_request_id = entry["request_id"]
        _take_bill(match, tokens, "[matched to the bill by estimate]")


def _take_bill(row: ProviderRequest, tokens: int, note: str) -> None:
    spec = MODELS.get(row.model)
    row.billed_tokens = tokens
    row.cost_nano_cny = spec.cost_nano_cny(tokens, batch=row.lane == "batch") if spec else row.cost_nano_cny
    row.error_message = f"{row.error_message or ''} {note}".strip()
