"""The reconciler: makes SQL's desired state and Qdrant agree, and closes abandoned ledger rows.

Run periodically by every `sidecar worker` (and once by `sidecar reconcile`). Each repair is
idempotent and guarded, so several processes reconciling at once do no harm:
- ledger rows still `sent` long after their call must have ended → `unknown`, with the estimate;
- an indexed document whose points are missing, of another version or incomplete → pending
  again (its vectors are in the embedding cache, so the repair costs no tokens);
- points of a deleted document, or of a document SQL does not know → deleted;
- old history past its retention → pruned (worker/sql/retention.py); a failure there is logged
  and never stops the repairs.
Expired leases need no repair: `documents.claim` takes them over.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import sqlalchemy as sa

from worker.ledger import calls, rollups
from worker.runtime import Runtime
from worker.sql import engines, retention
from worker.sql.models import Document, utcnow

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    abandoned_requests: int = 0
    redriven: int = 0
    removed: int = 0
    pruned: dict[str, int] = field(default_factory=dict)  # rows removed per table


def reconcile(rt: Runtime) -> Reconciled:
    report = Reconciled()
    report.pruned = prune(rt)
    grace = dt.timedelta(seconds=rt.settings.request_timeout_s * 2 + 60)
    with rt.sessions.begin() as session:
        report.abandoned_requests = calls.close_abandoned(session, older_than=utcnow() - grace)
    with rt.sessions() as session:
        collections = session.execute(sa.select(Document.collection).distinct()).scalars().all()
    for collection in collections:
        repair_collection(rt, collection, report)
    if report.abandoned_requests or report.redriven or report.removed:
        log.info(
            "reconcile.done abandoned=%d redriven=%d removed=%d",
            report.abandoned_requests,
            report.redriven,
            report.removed,
        )
    return report


def prune(rt: Runtime) -> dict[str, int]:
    """Fold the roll-up deltas, remove history past its retention; an error is logged (its type
    only) and skipped."""
    try:
        with rt.sessions.begin() as session:  # ledger roll-up deltas (PostgreSQL), so they never pile up
            rollups.fold(session)
        with rt.sessions() as session:  # it runs a short transaction per batch of its own
            return retention.prune(session, rt.settings, utcnow())
    except Exception as exc:  # pruning is housekeeping: the repairs below must still run
        log.warning("reconcile.prune_failed error=%s", type(exc).__name__)
        return {}


def repair_collection(rt: Runtime, collection: str, report: Reconciled) -> None:
    points = rt.store.doc_summaries(collection)  # read before SQL: a later change only adds work
    with rt.sessions() as session:
        rows = session.execute(
            sa.select(
                Document.id,
                Document.tenant,
                Document.doc_id,
                Document.status,
                Document.indexed_version,
                Document.chunk_count,
                Document.version,
            ).where(Document.collection == collection)
        ).all()
    known = set()
    redrive: list[tuple[int, int]] = []
    for row in rows:
        key = (row.tenant, row.doc_id)
        known.add(key)
        summary = points.get(key)
        if row.status == "indexed":
            if row.chunk_count == 0:
                complete = summary is None
            else:
                complete = summary is not None and summary.is_complete(row.indexed_version, row.chunk_count)
            if not complete:
                redrive.append((row.id, row.indexed_version))
        elif row.status == "deleted" and summary is not None:
            _remove(rt, collection, key, row.version, report)
    for key, summary in points.items():
        if key not in known:
            _remove(rt, collection, key, max(summary.versions), report)
    if redrive:
        with rt.sessions.begin() as session:
            for doc_id, version in redrive:
                report.redriven += engines.changed_rows(
                    session,
                    sa.update(Document)
                    .where(
                        Document.id == doc_id,
                        Document.status == "indexed",
                        Document.indexed_version == version,
                    )
                    .values(
                        status="pending",
                        lease_owner=None,
                        lease_until=None,
                        attempts=0,
                        last_error="reconciler: the store did not hold this version completely",
                    )
                    .execution_options(synchronize_session=False),
                )
        rt.wake.set()


def _remove(rt: Runtime, collection: str, key: tuple[str, str], version: int, report: Reconciled) -> None:
    tenant, doc_id = key
    rt.store.delete_document(collection, tenant, doc_id, version)
    report.removed += 1
