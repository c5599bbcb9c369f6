"""The embedded default's broker: kombu's SQLAlchemy transport on an SQLite file, made to lose
nothing when its worker is killed, and to keep no acknowledged message.

kombu's transport marks a message it hands out invisible and never looks at it again: its acks
live in the consumer's memory, so the messages a killed worker held stay invisible for ever
(lost), and acknowledged ones are never deleted (the file only grows). Here:

- a take hands out as many messages as the prefetch limit leaves room for, in one write
  transaction (kombu's takes one a transaction);
- an acknowledged message's row is deleted (a rejected or shut-down one's too, once kombu has
  put it back as a new row), in the transaction of the next take (or at close). A kill in
  between delivers those again;
- the first time a process consumes a queue, the rows an earlier consumer took and never
  acknowledged are made visible again and delivered marked `redelivered`, as kombu's Redis
  transport marks what it restores (so a message that kills the worker each time is counted and
  dead-lettered, worker/tasks.py): delivered twice, never lost (the ingest tasks are
  idempotent). That assumes one consuming process per file, which the embedded default is
  (Qdrant Edge admits one process);
- a row that is not a kombu message (a producer wrote it by hand: not JSON, another shape) is
  handed to the worker as task `sidecar.undeliverable`, which records it as a rejection, and is
  then deleted, as on Redis (worker/broker.py);
- rows that kombu's own transport left invisible before this one (acknowledged or lost: nobody
  can tell) are deleted once, the first time, and table `sidecar_broker_state` remembers it.
  Made visible they would run every message ever sent again.

The consumer polls every POLL_S instead of kombu's second (the bulk of a lone event's
publish-to-indexed time), and between two polls that found nothing it takes again as soon as a
task ends (a consumer at its prefetch limit finds nothing to take until then); kombu gives all
transport options to `create_engine`, so the interval is a class attribute.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, NamedTuple

import sqlalchemy as sa
from kombu.transport import sqlalchemy as kombu_sqla
from kombu.transport.virtual import Empty

from worker.entries import decode_entry, take_count, undeliverable_message

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the consumer polls the file (a query on a local file)
STATE_TABLE = "sidecar_broker_state"
DELETES_ACKED = "deletes-acked-rows"  # the marker: this file's invisible rows are in flight

_restored: set[tuple[str, str]] = set()  # (file, queue) this process has consumed already
_redelivered: set[tuple[str, int]] = set()  # (file, row) made visible again, until delivered
_restored_lock = threading.Lock()
_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def _bookkeeping(url: str) -> sa.Engine:
    """The engine of this module's own statements (deleting acknowledged rows at close,
    restoring taken ones): `synchronous=OFF`, no fsync, because losing one of them to a power cut
    only delivers a message again. kombu's engine (publishing, taking) keeps SQLite's default."""
    with _engines_lock:
        if url not in _engines:
            engine = sa.create_engine(url, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", lambda conn, _record: conn.execute("PRAGMA synchronous=OFF"))
            _engines[url] = engine
        return _engines[url]


class _Statements(NamedTuple):
    """A take's statements on the message table."""

    visible: Any  # the oldest visible rows of a queue: id, payload
    hide: Any  # mark rows taken
    delete: Any  # delete acknowledged rows


class Channel(kombu_sqla.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows: dict[str, int] = {}  # delivery tag -> its row, until acknowledged
        self._acked: list[int] = []  # rows acknowledged since the last take: deleted by the next
        self._acked_lock = threading.Lock()
        self._queue_ids: dict[str, int] = {}  # queue name -> its row (kombu never deletes one)

    def _get_and_deliver(self, queue: str, callback: Any) -> None:
        """As many messages as the prefetch limit leaves room for, taken in one transaction, each
        handed to kombu in turn; should a delivery raise, the ones after it are visible again."""
        taken = self._take(queue, take_count(self.qos.can_consume_max_estimate()))
        for n, payload in enumerate(taken):
            try:
                callback(payload, queue)
            except BaseException:
                self._put_back([later["properties"]["delivery_tag"] for later in taken[n + 1 :]])
                raise

    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        return self._take(queue, 1)[0]

    def _take(self, queue: str, limit: int) -> list[dict[str, Any]]:
        """kombu's `_get` for up to `limit` messages, remembering the row of each one handed
        out; the rows acknowledged since the last take are deleted in the same transaction (one
        write transaction a take, as kombu's a message). Core statements built once, and the
        queue's row looked up once: kombu's ORM query, flush and queue lookup on every take were
        a third of the embedded worker's CPU at one event a message."""
        self._restore_once(queue)
        queue_id = self._queue_id(queue)
        statements = self._statements
        session = self.session
        if session.bind.name == "sqlite":
            session.execute(sa.text("BEGIN IMMEDIATE TRANSACTION"))
        conn = session.connection()
        with self._acked_lock:
            acked, self._acked = self._acked, []
        try:
            if acked:
                conn.execute(statements.delete, {"ids": acked})
            rows = conn.execute(statements.visible, {"queue_id": queue_id, "n": limit}).all()
            if not rows:
                raise Empty()
            conn.execute(statements.hide, {"ids": [row.id for row in rows]})
            return [self._handed_out(queue, row.id, row.payload) for row in rows]
        except BaseException as exc:
            if not isinstance(exc, Empty):  # not deleted: the next take tries again
                with self._acked_lock:
                    self._acked.extend(acked)
            raise
        finally:
            session.commit()

    def _queue_id(self, queue: str) -> int | None:
        """The queue's row; not kept while kombu's declare has not committed one (its id None)."""
        if queue in self._queue_ids:
            return self._queue_ids[queue]
        found: int | None = self._get_or_create(queue).id
        if found is not None:
            self._queue_ids[queue] = found
        return found

    @functools.cached_property
    def _statements(self) -> _Statements:
        table = self.message_cls.__table__
        rows = table.c.id.in_(sa.bindparam("ids", expanding=True))
        return _Statements(
            visible=sa.select(table.c.id, table.c.payload)
            .where(table.c.queue_id == sa.bindparam("queue_id"), table.c.visible != False)  # noqa: E712
            .order_by(table.c.timestamp, table.c.id)  # the column of kombu's `sent_at`
            .limit(sa.bindparam("n"))
            .with_for_update(),
            hide=sa.update(table).where(rows).values(visible=False),
            delete=sa.delete(table).where(rows),
        )

    def _handed_out(self, queue: str, row: int, stored: Any) -> dict[str, Any]:
        """The message a taken row holds (or the sidecar.undeliverable task about it, whose ack
        deletes the row)."""
        raw = str(stored).encode("utf-8", "replace")
        payload, reason = decode_entry(raw)
        if payload is None:
            log.warning("broker.undeliverable queue=%s bytes=%d reason=%s", queue, len(raw), reason)
            payload = undeliverable_message(queue, raw, reason)
        properties = payload["properties"]
        self._rows[properties["delivery_tag"]] = row
        if (self._file, row) in _redelivered:
            _redelivered.discard((self._file, row))
            properties["delivery_info"]["redelivered"] = True
        return payload

    def _put_back(self, tags: list[str]) -> None:
        """Make the rows of messages taken but never handed out visible again."""
        rows = [row for row in (self._rows.pop(tag, None) for tag in tags) if row is not None]
        if rows:
            table = self.message_cls.__table__
            with _bookkeeping(self._file).begin() as conn:
                conn.execute(sa.update(table).where(table.c.id.in_(rows)).values(visible=True))

    @property
    def _file(self) -> str:
        return str(self.connection.client.hostname)

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple=multiple)
        self._forget(delivery_tag)
        self._freed()

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue=requeue)  # requeued: kombu put a new row
        self._forget(delivery_tag)
        self._freed()

    def _freed(self) -> None:
        """Wake the consumer (Transport.drain_events): a prefetch slot is free. None once the
        channel is closed (a task that ends after a reconnect)."""
        if self.connection is not None:
            self.connection.freed.set()

    def _restore(self, message: Any) -> None:
        super()._restore(message)  # a new row (an unacknowledged message at shutdown)
        self._forget(message.delivery_tag)
        self._delete_acked()

    def close(self) -> None:
        self._delete_acked()
        super().close()

    def _forget(self, delivery_tag: str) -> None:
        row = self._rows.pop(delivery_tag, None)
        if row is not None:
            with self._acked_lock:
                self._acked.append(row)

    def _delete_acked(self) -> None:
        """Delete the acknowledged rows now (at shutdown: no next take will)."""
        with self._acked_lock:
            acked, self._acked = self._acked, []
        if acked:
            table = self.message_cls.__table__
            with _bookkeeping(self._file).begin() as conn:
                conn.execute(sa.delete(table).where(table.c.id.in_(acked)))

    def _restore_once(self, queue: str) -> None:
        """Make the rows an earlier consumer of `queue` never acknowledged visible again (and, the
        first time on this file, delete the rows kombu's own transport left)."""
        key = (self._file, queue)
        if key in _restored:
            return
        with _restored_lock:
            if key in _restored:
                return
            messages, queues = self.message_cls.__table__, self.queue_cls.__table__
            with _bookkeeping(self._file).begin() as conn:
                conn.execute(
                    sa.text(f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (name VARCHAR(64) PRIMARY KEY)")
                )
                marker = {"name": DELETES_ACKED}
                marked = conn.execute(
                    sa.text(f"SELECT 1 FROM {STATE_TABLE} WHERE name = :name"), marker
                ).first()
                if marked is None:
                    gone = conn.execute(sa.delete(messages).where(messages.c.visible == False)).rowcount  # noqa: E712
                    conn.execute(sa.text(f"INSERT INTO {STATE_TABLE} (name) VALUES (:name)"), marker)
                    if gone:
                        log.warning("broker.legacy_rows_deleted rows=%d (left invisible by kombu)", gone)
                queue_id = sa.select(queues.c.id).where(queues.c.name == queue).scalar_subquery()
                taken = messages.c.visible == False, messages.c.queue_id == queue_id  # noqa: E712
                back = conn.execute(sa.select(messages.c.id).where(*taken)).scalars().all()
                conn.execute(sa.update(messages).where(*taken).values(visible=True))
            _redelivered.update((self._file, row) for row in back)
            if back:
                log.warning("broker.restored messages=%d (taken by a consumer that stopped)", len(back))
            _restored.add(key)


class Transport(kombu_sqla.Transport):
    Channel = Channel
    polling_interval = POLL_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freed = threading.Event()  # set by every ack or reject: a prefetch slot is free

    def drain_events(self, connection: Any, timeout: Any = None, **_kwargs: Any) -> None:
        """kombu's loop, waiting between empty polls on an ack instead of sleeping: a consumer at
        its prefetch limit (a take fills it) takes again as soon as a task ends."""
        started = time.monotonic()
        interval = self.polling_interval if not timeout else min(self.polling_interval, timeout)
        assert self.cycle is not None  # set up with the transport
        while True:
            self.freed.clear()
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                if timeout is not None and time.monotonic() - started >= timeout:
                    raise TimeoutError() from None
                self.freed.wait(interval)
