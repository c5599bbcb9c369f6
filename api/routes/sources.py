"""GET /v1/sources: the change-capture sources (`sidecar capture`, worker/capture/) and how they do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from api import deps
from api.auth import can_read
from api.deps import session
from worker.capture.exposition import not_ready, sources_report
from worker.settings import Settings

router = APIRouter()


@router.get("/v1/sources", dependencies=[Depends(can_read)], summary="Change-capture sources")
def get_sources(settings: Settings = Depends(deps.settings), s: Session = Depends(session)) -> dict[str, Any]:
    """`{"sources": [...], "not_ready": [...]}`: each source's kind, phase (`snapshot`,
    `streaming`), up (a heartbeat in the last minute), position (LSN or stream entry id), lag in
    bytes (PostgreSQL slots) and seconds, rows committed and per second, rows rejected, errors and
    the last one; `not_ready` lists the sources /readyz reports (down, or past
    SIDECAR_CAPTURE_MAX_LAG_S / SIDECAR_CAPTURE_MAX_LAG_BYTES)."""
    return {"sources": sources_report(s), "not_ready": not_ready(s, settings)}
