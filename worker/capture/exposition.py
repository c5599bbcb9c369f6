"""What capture adds to /metrics, `sidecar status` and /readyz, from `capture_sources` (state.py).

Metric names are a contract (the Grafana dashboard uses them): `sidecar_source_lag_bytes`,
`sidecar_source_lag_seconds`, `sidecar_source_rows_total`, `sidecar_source_errors_total`,
`sidecar_source_up`, each labelled `source`.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy.orm import Session

from worker.capture import state
from worker.settings import Settings


class Exposition(Protocol):
    def family(self, name: str, kind: str, help_: str) -> None: ...

    def sample(self, name: str, value: Any, **labels: Any) -> None: ...


def write_metrics(out: Exposition, session: Session) -> None:
    """The source families (no sample while no source ever ran)."""
    sources = state.report(session)
    families = (
        (
            "source_lag_bytes",
            "gauge",
            "WAL a source's replication slot holds behind the server.",
            "lag_bytes",
        ),
        ("source_lag_seconds", "gauge", "How far behind its database or stream a source is.", "lag_s"),
        ("source_rows_total", "counter", "Changes a source read and committed.", "rows_total"),
        (
            "source_errors_total",
            "counter",
            "Failures of a source (each retried after a backoff).",
            "errors_total",
        ),
        ("source_up", "gauge", "1 while a source's capture process writes heartbeats.", "up"),
    )
    for name, kind, help_, key in families:
        out.family(name, kind, help_)
        for source in sources:
            if source[key] is not None:
                out.sample(name, source[key], source=source["name"])


def sources_report(session: Session) -> list[dict[str, Any]]:
    """`sidecar status --json` key "sources" and GET /v1/sources."""
    return state.report(session)


def not_ready(session: Session, settings: Settings) -> list[str]:
    """/readyz reasons: sources down, behind by more than SIDECAR_CAPTURE_MAX_LAG_S, or whose slot
    holds more WAL than SIDECAR_CAPTURE_MAX_LAG_BYTES."""
    return state.lagging(
        state.report(session),
        max_lag_s=settings.capture_max_lag_s,
        max_lag_bytes=settings.capture_max_lag_bytes,
    )
