"""A `kind = "postgres"` source: PostgreSQL logical replication with the built-in `pgoutput` plugin.

First start: the publication (table and `where`), then the replication slot created with an
exported snapshot; the table is copied in that snapshot (version: the slot's consistent point)
and committed before the stream starts at that very point, so nothing is missed or doubled
between the two. Streaming: each transaction's changes carry its commit LSN as version; batches
of whole transactions go through the accept path (worker/capture/accept.py), then the slot is
told the position (flush LSN) — after the commit, never before, so a kill replays rather than
loses. A capture killed during its first snapshot takes it again (the slot is made anew).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from contextlib import closing
from typing import Any

import psycopg2
import psycopg2.extras

from worker.capture import pgcatalog, state
from worker.capture.accept import Accepted, Change, accept_changes, truncate_events
from worker.capture.pgcatalog import Table
from worker.capture.pgoutput import UNCHANGED, Begin, Commit, Decoder, RowChange, Truncate, lsn_int, lsn_str
from worker.capture.sources import Source
from worker.intake import ingest_events
from worker.runtime import Runtime

log = logging.getLogger(__name__)
LAG_EVERY_S = 2.0
ONCE_IDLE_S = 5.0  # --once: stop when nothing arrived for this long, even without the server's word


class PostgresCapture:
    def __init__(self, rt: Runtime, source: Source, *, stop: threading.Event, once: bool = False) -> None:
        assert source.dsn is not None
        self.rt, self.source, self.dsn, self.stop, self.once = rt, source, source.dsn, stop, once
        lane = rt.settings.capture_snapshot_lane
        self.snapshot_lane = "batch" if lane == "batch" else None
        self.batch_rows = rt.settings.capture_batch_rows

    def run(self) -> None:
        """Prepare, snapshot if needed, then stream until stopped (or drained, with `once`)."""
        with closing(pgcatalog.connect(self.dsn)) as conn:
            table = pgcatalog.describe(conn, self.source)
            pgcatalog.ensure_publication(conn, self.source, table)
            with self.rt.sessions.begin() as session:
                phase = state.source_row(session, self.source.name, "postgres").phase
            repl = _replication(self.dsn)
            try:
                if phase != "streaming" or pgcatalog.slot_lsn(conn, self.source.slot) is None:
                    pgcatalog.drop_slot(conn, self.source)  # an unfinished snapshot's slot
                    pgcatalog.ensure_publication(conn, self.source, table)
                    self._snapshot(repl, table, slot=self.source.slot, temporary=False)
                self._stream(repl, conn, table)
            finally:
                repl.close()

    # --- snapshot -------------------------------------------------------------------------------

    def _snapshot(
        self, repl: Any, table: Table, *, slot: str, temporary: bool
    ) -> tuple[int, set[tuple[str, str]]]:
        """Create `slot` with an exported snapshot and copy the table in it; (version, documents)."""
        cur = repl.cursor()
        kind = "TEMPORARY LOGICAL" if temporary else "LOGICAL"
        if repl.server_version >= 150000:
            cur.execute(f"CREATE_REPLICATION_SLOT \"{slot}\" {kind} pgoutput (SNAPSHOT 'export')")
        else:
            cur.execute(f'CREATE_REPLICATION_SLOT "{slot}" {kind} pgoutput EXPORT_SNAPSHOT')
        _, consistent_point, snapshot_name, _ = cur.fetchone()
        version = lsn_int(consistent_point)
        log.info("capture.snapshot source=%s version=%s", self.source.name, consistent_point)
        seen: set[tuple[str, str]] = set()
        for rows in pgcatalog.copy_snapshot(self.dsn, snapshot_name, self.source, table, self.batch_rows):
            changes = [
                Change("upsert", version, row, f"snapshot {consistent_point}", self.snapshot_lane)
                for row in rows
            ]
            result = accept_changes(
                self.rt, self.source, changes, message_id=f"capture:{slot}:{consistent_point}"
            )
            seen |= result.documents
            self._record(result, len(rows), position=None)
        if not temporary:
            with self.rt.sessions.begin() as session:
                row = state.source_row(session, self.source.name, "postgres")
                row.phase, row.consistent_point, row.position = "streaming", version, consistent_point
        return version, seen

    def resync(self) -> dict[str, int]:
        """Copy the table again in a fresh snapshot (rows marked for the batch lane when it is on)
        and delete the documents of the source's collection the table no longer holds."""
        with closing(pgcatalog.connect(self.dsn)) as conn, closing(_replication(self.dsn)) as repl:
            table = pgcatalog.describe(conn, self.source)
            slot = f"{self.source.slot}_resync"[:63]
            version, seen = self._snapshot(repl, table, slot=slot, temporary=True)
        gone = [
            e
            for e in truncate_events(self.rt, self.source, version)
            if (e["tenant"], e["doc_id"]) not in seen
        ]
        if gone:
            ingest_events(self.rt, gone, message_id=f"capture:{self.source.name}:resync:{version}")
        return {"version": version, "rows": len(seen), "deleted": len(gone)}

    # --- streaming ------------------------------------------------------------------------------

    def _stream(self, repl: Any, conn: Any, table: Table) -> None:
        cur = repl.cursor()
        options = {"proto_version": "1", "publication_names": self.source.publication}
        cur.start_replication(slot_name=self.source.slot, decode=False, options=options)
        stream = _Stream(self, cur, conn, table)
        _, target = pgcatalog.lag_bytes(conn, self.source.slot)
        last_message = time.monotonic()
        while not self.stop.is_set():
            message = cur.read_message()
            if message is not None:
                stream.take(message.payload)
                last_message = time.monotonic()
                continue
            stream.flush()
            stream.idle()
            if self.once and stream.tx is None:
                if cur.wal_end >= target or time.monotonic() - last_message > ONCE_IDLE_S:
                    break
                cur.send_feedback(reply=True)
            select.select([repl], [], [], self.rt.settings.capture_idle_s)
        stream.flush()

    def _record(
        self, result: Accepted, rows: int, *, position: str | None, lag_s: float | None = None
    ) -> None:
        with self.rt.sessions.begin() as session:
            row = state.source_row(session, self.source.name, "postgres")
            state.record_batch(
                session,
                row,
                rows=rows,
                rejected=result.rejected,
                position=position,
                lag_s=lag_s,
                process=self.rt.process,
            )


class _Stream:
    """One replication stream's bookkeeping: the open transaction, the batch, what was acknowledged."""

    def __init__(self, capture: PostgresCapture, cur: Any, conn: Any, table: Table) -> None:
        self.capture, self.cur, self.conn, self.table = capture, cur, conn, table
        self.decoder = Decoder()
        self.tx: list[Change] | None = None
        self.tx_version = 0
        self.batch: list[Change] = []
        self.end_lsn = 0  # of the last transaction in the batch
        self.commit_ts_s = 0.0
        self.acked = 0
        self.measured = 0.0

    def take(self, payload: bytes) -> None:
        item = self.decoder.decode(payload)
        if isinstance(item, Begin):
            self.tx, self.tx_version = [], item.final_lsn
        elif isinstance(item, RowChange) and self.tx is not None:
            self.tx.append(_change(item, self.tx_version))
        elif isinstance(item, Truncate) and self.tx is not None:
            self.tx.append(Change("truncate", self.tx_version, {}, lsn_str(self.tx_version)))
        elif isinstance(item, Commit):
            self.batch.extend(self.tx or [])
            self.tx, self.end_lsn, self.commit_ts_s = None, item.end_lsn, item.commit_ts_s
            if len(self.batch) >= self.capture.batch_rows:
                self.flush()
            elif not self.batch:
                self._ack(item.end_lsn)

    def flush(self) -> None:
        """Commit the batch, record the position, then acknowledge it to the slot."""
        if not self.batch:
            return
        capture, position = self.capture, lsn_str(self.end_lsn)
        result = accept_changes(
            capture.rt,
            capture.source,
            self.batch,
            message_id=f"capture:{capture.source.name}:{position}",
            reread=lambda row: pgcatalog.reread(self.conn, capture.source, self.table, row),
        )
        capture._record(result, len(self.batch), position=position, lag_s=time.time() - self.commit_ts_s)
        self.batch = []
        self._ack(self.end_lsn)
        self.measure(lag_s=None)

    def idle(self) -> None:
        """Nothing to read: everything received is committed, so the slot may move to the server's
        end (changes of other tables, filtered out); measure the lag now and then."""
        if self.tx is None and not self.batch and self.cur.wal_end > self.acked:
            self._ack(self.cur.wal_end)
        self.measure(lag_s=0.0)

    def measure(self, *, lag_s: float | None) -> None:
        """Now and then: the WAL the slot holds, and a heartbeat (also under a steady stream)."""
        if time.monotonic() - self.measured < LAG_EVERY_S:
            return
        self.measured = time.monotonic()
        behind, _ = pgcatalog.lag_bytes(self.conn, self.capture.source.slot)
        with self.capture.rt.sessions.begin() as session:
            row = state.source_row(session, self.capture.source.name, "postgres")
            state.heartbeat(session, row, lag_bytes=behind, lag_s=lag_s)
            if self.acked:
                row.position = lsn_str(self.acked)

    def _ack(self, lsn: int) -> None:
        self.cur.send_feedback(flush_lsn=lsn, force=True)
        self.acked = max(self.acked, lsn)


def _change(item: RowChange, version: int) -> Change:
    position = lsn_str(version)
    if item.kind == "delete":
        return Change("delete", version, item.old or {}, position)
    new = dict(item.new or {})
    if item.old:  # REPLICA IDENTITY FULL: an unchanged TOASTed value is in the old row
        for column, value in new.items():
            if value == UNCHANGED and item.old.get(column, UNCHANGED) != UNCHANGED:
                new[column] = item.old[column]
    return Change("upsert", version, new, position)


def _replication(dsn: str) -> Any:
    return psycopg2.connect(
        dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        application_name="sidecar-capture",
        connect_timeout=10,
    )
