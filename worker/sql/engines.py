"""Engines and sessions for SQLite or PostgreSQL, and the one dialect-aware insert (ON CONFLICT).

SQLite runs in WAL mode and begins every transaction with BEGIN IMMEDIATE, so a transaction
that reads and then writes never fails with SQLITE_BUSY half way.

PostgreSQL connections are not pinged before each use (`pool_pre_ping` costs a round trip and a
transaction of its own per checkout). A connection the server closed (a restart,
`pg_terminate_backend`, an idle timeout) has told its socket so: at checkout a readable or
closed socket, found without a round trip, makes the pool drop it and open another. A
connection lost between checkout and use fails its transaction with a disconnect error; the pool
then drops every older connection too, and the caller retries (the ingest task retries the
message, the embedding loop its next cycle).
"""

from __future__ import annotations

import functools
import select
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
    engine = sa.create_engine(url, **kwargs)
    event.listen(engine, "checkout", _drop_if_closed)
    return engine


def _drop_if_closed(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Raise DisconnectionError (the pool then opens a new connection) when the server closed
    this idle connection: its socket is closed, or readable while no query is running (the
    server's goodbye, or end of file). No round trip."""
    if getattr(dbapi_conn, "closed", False):
        raise sa.exc.DisconnectionError("the connection was closed")
    try:
        poller = select.poll()  # not select(): a process may hold more than 1,024 descriptors
        poller.register(dbapi_conn.fileno(), select.POLLIN)
        ready = poller.poll(0)
    except (OSError, ValueError) as exc:  # no socket any more
        raise sa.exc.DisconnectionError("the connection has no socket") from exc
    if ready:
        raise sa.exc.DisconnectionError("the server closed the connection")


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


# The hot path's statements are built once per dialect and table and run with the rows as
# parameters (one row, or many in one round trip: SQLAlchemy's insertmanyvalues); building a
# statement with the rows inside, and its cache key, cost more than running it.
@functools.cache
def _ignoring(dialect: str, table: sa.Table, returning: tuple[str, ...] | None) -> sa.Insert:
    """INSERT … ON CONFLICT DO NOTHING, RETURNING the named columns (None: nothing)."""
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    ignoring = insert.on_conflict_do_nothing()
    return ignoring.returning(*(table.c[name] for name in returning)) if returning else ignoring


@functools.cache
def _adding(dialect: str, table: sa.Table, column: str) -> sa.Insert:
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return insert.on_conflict_do_update(
        index_elements=list(table.primary_key.columns),
        set_={column: table.c[column] + insert.excluded[column]},
    )


@functools.cache
def _primary_key(model: type[Base]) -> tuple[str, ...]:
    return tuple(column.name for column in _table(model).primary_key.columns)


def _table(model: type[Base]) -> sa.Table:
    return cast("sa.Table", model.__table__)


def insert_ignore(session: Session, model: type[Base], rows: dict[str, Any] | list[dict[str, Any]]) -> int:
    """INSERT … ON CONFLICT DO NOTHING on either dialect; returns how many rows went in.

    Every row must name the same columns (a column left out takes its default)."""
    if not rows:
        return 0
    # rowcount is not reliable here (psycopg reports -1), so count the RETURNING rows.
    stmt = _ignoring(session.get_bind().dialect.name, _table(model), _primary_key(model))
    return len(session.execute(stmt, rows).all())


def inserted_keys(
    session: Session, model: type[Base], rows: list[dict[str, Any]], key: tuple[str, ...]
) -> set[tuple[Any, ...]]:
    """insert_ignore of `rows` in one round trip; the `key` columns of the rows that went in.

    On PostgreSQL several rows go as one array per column (`_unnesting`): one statement text
    whatever the number of rows, so SQLAlchemy and psycopg each prepare it once. A multi-row
    VALUES list instead has a text per row count and, past 50 parameters, psycopg parses it
    anew each time (that parse was a fifth of a worker's CPU at 50 events a message)."""
    if not rows:
        return set()
    dialect = session.get_bind().dialect
    table = _table(model)
    if dialect.name == "postgresql" and len(rows) > 1:
        columns = tuple(rows[0])
        stmt, processors = _unnesting(dialect, table, columns, key)
        arrays = {
            f"p{i}": [row[name] for row in rows] if process is None else [process(row[name]) for row in rows]
            for i, (name, process) in enumerate(zip(columns, processors, strict=True))
        }
        return {tuple(row) for row in session.execute(stmt, arrays)}
    return {tuple(row) for row in session.execute(_ignoring(dialect.name, table, key), rows)}


@functools.cache
def _unnesting(
    dialect: sa.Dialect, table: sa.Table, columns: tuple[str, ...], returning: tuple[str, ...]
) -> tuple[sa.TextClause, list[Any]]:
    """INSERT … SELECT FROM unnest(one array per column) ON CONFLICT DO NOTHING RETURNING
    `returning`, and each column's bind processor (JSON, UTC datetimes), applied per element."""
    quote = dialect.identifier_preparer.quote
    arrays = ", ".join(
        f"CAST(:p{i} AS {_element_type(dialect, table.c[name])}[])" for i, name in enumerate(columns)
    )
    stmt = sa.text(
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in columns)}) "
        f"SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING "
        f"RETURNING {', '.join(quote(name) for name in returning)}"
    )
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns]
    return stmt, processors


def _element_type(dialect: sa.Dialect, column: sa.Column[Any]) -> str:
    """The column's type for the array cast; strings as TEXT, so that a value too long for the
    column fails the INSERT as it would in a VALUES list (a cast to VARCHAR(n) cuts it short)."""
    return "TEXT" if isinstance(column.type, sa.String) else str(column.type.compile(dialect=dialect))


def insert_ignore_all(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """insert_ignore without counting: the driver's executemany (one statement text however many
    rows, so the driver parses it once)."""
    if rows:
        session.execute(_ignoring(session.get_bind().dialect.name, _table(model), None), rows)


def insert_or_add(session: Session, model: type[Base], rows: list[dict[str, Any]], *, column: str) -> None:
    """INSERT … ON CONFLICT (primary key) DO UPDATE SET `column` = `column` + the new row's value."""
    if rows:
        session.execute(_adding(session.get_bind().dialect.name, _table(model), column), rows)


def changed_rows(session: Session, statement: sa.Executable) -> int:
    """Run an UPDATE or DELETE; returns how many rows it matched."""
    result = session.execute(statement)
    return cast("sa.CursorResult[Any]", result).rowcount


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
