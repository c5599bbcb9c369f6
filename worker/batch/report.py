"""Where the batch lane can run, and what it is doing (`sidecar status`, `/readyz` details).

Light on imports: the status report reads this without loading the lane itself.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.settings import Settings
from worker.sql.batch_models import BatchJob
from worker.sql.models import Document

BATCH_MODELS = ("text-embedding-v1", "text-embedding-v2", "text-embedding-v3", "text-embedding-v4")
BATCH_REGIONS = ("beijing",)  # the provider offers embedding batch jobs in Beijing only


def unavailable_reason(settings: Settings) -> str | None:
    """Why the batch lane cannot run with these settings (its documents then go real-time)."""
    if not settings.batch_enabled:
        return "SIDECAR_BATCH_ENABLED=false"
    if settings.region not in BATCH_REGIONS:
        return f"the Batch API serves no embedding model in region {settings.region}"
    if (reason := model_reason(settings.embedding_model)) is not None:
        return reason
    if settings.sparse_vectors:
        return "sparse vectors need the native API, which the Batch API does not offer"
    return None


def model_reason(model: str) -> str | None:
    """Why the Batch API cannot embed with `model` (a collection routed to it goes real-time)."""
    return None if model in BATCH_MODELS else f"the Batch API does not serve {model}"


def batch_status(session: Session, settings: Settings) -> dict[str, Any]:
    """{"available", "fallback_reason", "jobs" by state, "waiting_documents", "lines_running"}."""
    jobs = dict(session.execute(sa.select(BatchJob.state, sa.func.count()).group_by(BatchJob.state)).all())
    running = session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(BatchJob.lines), 0)).where(
            BatchJob.state.in_(("packed", "uploaded", "submitted"))
        )
    ).scalar_one()
    waiting = session.execute(
        sa.select(sa.func.count()).where(Document.status == "pending", Document.lane == "batch")
    ).scalar_one()
    reason = unavailable_reason(settings)
    return {
        "available": reason is None,
        "fallback_reason": reason,
        "jobs": {state: int(n) for state, n in sorted(jobs.items())},
        "waiting_documents": int(waiting),
        "lines_running": int(running),
    }
