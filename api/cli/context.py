"""What the command modules share: the database opened after the schema check, and work run in a
session on it. Each command builds its `Settings` once and hands it here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from worker.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

T = TypeVar("T")


def open_engine(settings: Settings, *, check: bool = True) -> Engine:
    """An engine on SIDECAR_DATABASE_URL; with `check`, SchemaOutdated unless at the head revision."""
    from worker.sql import engines, schema

    engine = engines.make_engine(settings.resolved_database_url())
    if check:
        schema.check_schema(engine)
    return engine


def run_report(settings: Settings, report: Callable[[Session], T]) -> T:
    """What `report` reads in one session."""
    from sqlalchemy.orm import Session

    engine = open_engine(settings)
    try:
        with Session(engine) as session:
            return report(session)
    finally:
        engine.dispose()


def run_transaction(settings: Settings, work: Callable[[Session], T]) -> T:
    """What `work` returns, its writes committed in one transaction."""
    from sqlalchemy.orm import Session

    engine = open_engine(settings)
    try:
        with Session(engine) as session, session.begin():
            return work(session)
    finally:
        engine.dispose()
