"""Every module that defines tables, imported so that `Base.metadata` is complete (Alembic's env and
the schema check use it): worker/sql/models.py plus one module per area."""

from __future__ import annotations

from worker.sql import backlog_models, batch_models, models, reembed_models, rollup_models, source_models
from worker.sql.models import Base

__all__ = [
    "Base",
    "backlog_models",
    "batch_models",
    "models",
    "reembed_models",
    "rollup_models",
    "source_models",
]
