"""Engines and sessions for SQLite or PostgreSQL, and the one dialect-aware insert (ON CONFLICT).

SQLite runs in WAL mode and begins every transaction with BEGIN IMMEDIATE, so a transaction
that reads and then writes never fails with SQLITE_BUSY half way.
"""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.sql.models import Base


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the project's connection settings for SQLite or PostgreSQL."""
    # hide_parameters: a failed statement's error never carries document text (or anything else
    # bound to it) into a log line or a retry message.
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)
        _sqlite_setup(engine)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def dialect_insert(session: Session, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """`INSERT INTO model` of the session's dialect, which knows ON CONFLICT (SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def insert_ignore(session: Session, model: type[Base], rows: dict[str, Any] | list[dict[str, Any]]) -> int:
    """INSERT … ON CONFLICT DO NOTHING on either dialect; returns how many rows went in."""
    # rowcount is not reliable here (psycopg reports -1), so count the RETURNING rows.
    key = sa.inspect(model).primary_key[0]
    stmt = dialect_insert(session, model).values(rows).on_conflict_do_nothing().returning(key)
    return len(session.execute(stmt).all())


def insert_or_add(session: Session, model: type[Base], rows: list[dict[str, Any]], *, column: str) -> None:
    """INSERT … ON CONFLICT (primary key) DO UPDATE SET `column` = `column` + the new row's value."""
    if not rows:
        return
    keys = [c.name for c in sa.inspect(model).primary_key]
    stmt = dialect_insert(session, model).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys,
        set_={column: getattr(model, column) + getattr(stmt.excluded, column)},
    )
    session.execute(stmt)


def changed_rows(session: Session, statement: sa.Executable) -> int:
    """Run an UPDATE or DELETE; returns how many rows it matched."""
    result = session.execute(statement)
    return cast("sa.CursorResult[Any]", result).rowcount


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
