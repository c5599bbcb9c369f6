"""What a PostgreSQL source needs from the application's database, over plain (non-replication)
psycopg2 connections: the table's columns and key, its publication (with the `where` row filter),
the replication slot's state, the copy of a snapshot, reading one row again, dropping a slot.

Values are read as `::text` and typed like the stream's (worker/capture/pgoutput.py), so a row
gives the same event from a snapshot and from the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from worker.capture.pgoutput import lsn_int, typed
from worker.capture.sources import Source
from worker.errors import ConfigError

ROW_FILTER_SERVER = 150000  # publication WHERE: PostgreSQL 15


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    types: dict[str, int]  # column → type oid
    key: tuple[str, ...]  # primary key columns
    replica_full: bool

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)


def connect(dsn: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn, application_name="sidecar-capture", connect_timeout=10)
    conn.autocommit = True
    return conn


def describe(conn: psycopg2.extensions.connection, source: Source) -> Table:
    """The table's columns and key; ConfigError when it or a column the templates use is missing."""
    schema, name = source.schema_table()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (schema, name),
        )
        found = cur.fetchone()
        if found is None:
            raise ConfigError(f"source {source.name!r}.table: {source.table} does not exist")
        oid, identity = found
        cur.execute(
            "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (oid,),
        )
        types = {str(n): int(t) for n, t in cur.fetchall()}
        cur.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary",
            (oid,),
        )
        key = tuple(str(r[0]) for r in cur.fetchall())
    missing = sorted(source.columns - set(types))
    if missing:
        raise ConfigError(f"source {source.name!r}: column {missing[0]!r} is not in {source.table}")
    return Table(schema, name, types, key, replica_full=identity == "f")


def ensure_publication(conn: psycopg2.extensions.connection, source: Source, table: Table) -> None:
    """The source's publication, created or set to the table and `where` of the sources file."""
    if source.where and conn.server_version < ROW_FILTER_SERVER:
        raise ConfigError(f"source {source.name!r}.where: row filters need PostgreSQL 15 or later")
    if source.where and not table.replica_full:
        raise ConfigError(
            f"source {source.name!r}.where: updates and deletes of a filtered table need every filter "
            f"column in the replica identity: run ALTER TABLE {source.table} REPLICA IDENTITY FULL"
        )
    target = sql.SQL("TABLE {}").format(table.ident)
    if source.where:
        target = sql.SQL("{} WHERE ({})").format(target, sql.SQL(source.where))
    pub = sql.Identifier(source.publication)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (source.publication,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE PUBLICATION {} FOR {}").format(pub, target))
        else:
            cur.execute(sql.SQL("ALTER PUBLICATION {} SET {}").format(pub, target))


def slot_lsn(conn: psycopg2.extensions.connection, slot: str) -> int | None:
    """The slot's confirmed flush LSN, or None when there is no such slot (0: none confirmed yet)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        row = cur.fetchone()
    if row is None:
        return None
    return lsn_int(row[0]) if row[0] else 0


def lag_bytes(conn: psycopg2.extensions.connection, slot: str) -> tuple[int | None, int]:
    """(WAL the slot holds behind the server's current position, that position)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_current_wal_lsn()::text, "
            "(SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s)",
            (slot,),
        )
        found = cur.fetchone()
    assert found is not None  # one row, always
    current, confirmed = found
    now = lsn_int(current)
    return (None if confirmed is None else max(0, now - lsn_int(confirmed))), now


def drop_slot(conn: psycopg2.extensions.connection, source: Source) -> bool:
    """Drop the source's slot (and publication); True if the slot was there."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            (source.slot,),
        )
        dropped: bool = cur.rowcount > 0
        cur.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(source.publication)))
    return dropped


def _select(source: Source, table: Table) -> sql.Composed:
    columns = sorted(source.columns | set(table.key))
    fields = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("SELECT {} FROM {}").format(fields, table.ident)


def copy_snapshot(
    dsn: str, snapshot: str, source: Source, table: Table, batch_rows: int
) -> Iterator[list[dict[str, Any]]]:
    """The table's rows (passing `where`) as they were in the exported `snapshot`, in batches."""
    query = _select(source, table)
    if source.where:
        query = sql.SQL("{} WHERE ({})").format(query, sql.SQL(source.where))
    with closing(psycopg2.connect(dsn, application_name="sidecar-capture-snapshot")) as conn:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
        with conn.cursor(name="sidecar_snapshot") as cur:
            cur.itersize = batch_rows
            cur.execute(query)
            while rows := cur.fetchmany(batch_rows):
                names = [d[0] for d in cur.description or ()]  # a named cursor's, after its first fetch
                yield [_typed_row(names, row, table) for row in rows]
        conn.rollback()


def reread(
    conn: psycopg2.extensions.connection, source: Source, table: Table, row: dict[str, Any]
) -> dict[str, Any] | None:
    """The row as it is now, found by its primary key; None when it is gone (or has no key)."""
    if not table.key or any(row.get(k) is None for k in table.key):
        return None
    where = sql.SQL(" AND ").join(sql.SQL("{}::text = %s").format(sql.Identifier(k)) for k in table.key)
    query = sql.SQL("{} WHERE {}").format(_select(source, table), where)
    with conn.cursor() as cur:
        cur.execute(query, [_as_text(row[k]) for k in table.key])
        found = cur.fetchone()
        names = [d[0] for d in cur.description] if cur.description else []
    return None if found is None else _typed_row(names, found, table)


def _typed_row(names: list[str], values: tuple[Any, ...], table: Table) -> dict[str, Any]:
    return {
        n: None if v is None else typed(v, table.types.get(n, 25)) for n, v in zip(names, values, strict=True)
    }


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
