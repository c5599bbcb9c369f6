"""A Redis transport for Celery that loses no message when a worker is killed, and is stopped by
no queue entry.

kombu's Redis transport takes a message off its queue with BRPOP and records it as unacked only
after it has read the reply, in a second round trip. A worker killed in between loses the message:
a large process keeps its sockets open for a while as it tears down, and Redis hands it whatever
arrives (kombu#305, celery#7924; seen in `bench.chaos` as events published just after a
SIGKILL). This transport pops in one Lua call that records what it takes as unacked in the same
call (from where the visibility timeout restores it), up to as many messages as the prefetch
limit leaves room for: one round trip per pop instead of two per message, and never in neither
place. When every list is empty it blocks with BLMOVE onto an in-flight list of its own
consumer, and removes the message from there in the MULTI that records it as unacked
(`QoS.append`); any live consumer moves the in-flight lists of consumers whose heartbeat has
expired back onto their queues. A message may so be delivered twice, never lost; the ingest
tasks are idempotent.

Priorities: kombu keeps a queue's messages of priority 3, 6 and 9 (its `priority_steps`) in
sub-lists (`queue\\x06\\x163` ...; on Redis a lower number goes first). Each pop takes from the
lists in that order, and blocks on the plain queue when all are empty (a message that lands in a
sub-list meanwhile waits at most one poll, `brpop_timeout`). kombu's other commands (acks,
unacked records, event publishes) share one redis client instead of building one per command.

An entry that is not a kombu message (not UTF-8, not JSON, JSON of another shape, or a message
whose body is not JSON, which Celery would drop without a trace) is moved to
`<queue>.undeliverable` (capped at UNDELIVERABLE_CAP entries) and handed to the worker as a task
`sidecar.undeliverable` with one argument `{"queue", "raw", "reason"}`, `raw` being the entry as
JSON-escaped text of at most RAW_CHARS characters (worker/entries.py), so that it is recorded
and the consumer goes on with the next entry.

Limit: one queue per consumer (the worker consumes the one queue the sidecar uses); with more,
pops fall back to kombu's BRPOP.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker.entries import decode_entry, take_count, undeliverable_message

log = logging.getLogger(__name__)

INFLIGHT_PREFIX = "sidecar:inflight:"  # + consumer id (32 hex) + ":" + queue key
ALIVE_PREFIX = "sidecar:consumer:"  # + consumer id; expires when the consumer stops beating
HEARTBEAT_S = 5.0
DEAD_AFTER_S = 30
SWEEP_S = 10.0
UNDELIVERABLE_SUFFIX = ".undeliverable"
UNDELIVERABLE_CAP = 10_000

# Move a dead consumer's in-flight messages back to the end of the queue that is popped next.
_RESTORE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[3], 'RIGHT', 'RIGHT') do n = n + 1 end
return n
"""


# Take up to ARGV[1] entries off the lists KEYS[1..n], in that order (the right end first).
# With ARGV[3] = "1" each one that names a delivery tag, exchange and routing key as kombu's
# messages do is recorded as unacked as kombu records it (index KEYS[2n+1], score ARGV[2]; hash
# KEYS[2n+2], `[message, exchange, routing_key]` in JSON); any other goes onto its list's
# in-flight list KEYS[n+i] for the worker to judge (and so does every entry without ARGV[3]).
# Returns {i, entry, tag or false} per entry, oldest first; empty when all lists are.
_POP = """
local n = (#KEYS - 2) / 2
local index, unacked = KEYS[2 * n + 1], KEYS[2 * n + 2]
local want, now, record = tonumber(ARGV[1]), ARGV[2], ARGV[3] == '1'
local out = {}
for i = 1, n do
  while #out < want do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local tag = false
    if record then
      local ok, m = pcall(cjson.decode, item)
      local p = ok and type(m) == 'table' and m.properties
      local info = type(p) == 'table' and p.delivery_info
      if type(info) == 'table' and type(p.delivery_tag) == 'string'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        tag = p.delivery_tag
        redis.call('ZADD', index, now, tag)
        redis.call('HSET', unacked, tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
      end
    end
    if not tag then redis.call('LPUSH', KEYS[n + i], item) end
    out[#out + 1] = {i, item, tag}
  end
end
return out
"""


class Taken(NamedTuple):
    """An entry being delivered: its in-flight list, and the tag the pop recorded it under, as
    Redis has it (None: not recorded; it is on that in-flight list)."""

    source: str
    inflight: str
    item: bytes
    recorded: bytes | None


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        """Record `message` as unacked. The pop recorded it already under this tag: only the
        in-process record is left to make. Taken off an in-flight list instead: it leaves that
        list in the MULTI that records it (one round trip, and never in neither place)."""
        taken, self.channel._taken = self.channel._taken, None
        if taken is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu is untyped
            return
        if taken.recorded is None or taken.recorded != delivery_tag.encode("utf-8", "surrogatepass"):
            delivery = message.delivery_info
            record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                    self.unacked_key, delivery_tag, record
                )
                if taken.recorded is None:
                    pipe.lrem(taken.inflight, 1, taken.item)
                else:  # the pop read another tag than kombu did (JSON only a Lua parser took so)
                    self._remove_from_indices(taken.recorded, pipe)  # type: ignore[no-untyped-call]
                pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]  # the in-process record

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu's, except for a record it could not put back: one Python's JSON refuses (an
        entry the pop recorded before the worker could judge it: Redis's Lua parser takes
        numbers Python's refuses) or routed to no queue. kombu raises on the first, at every
        worker's start too, and drops the second; such a record goes to `unacked.undeliverable`
        (capped) instead."""
        with self.channel.conn_or_acquire(client) as conn:
            record = conn.hget(self.unacked_key, tag)
            problem = None if record is None else _record_problem(self.channel, record)
            if problem is None:
                super().restore_by_tag(tag, client=conn, leftmost=leftmost)  # type: ignore[no-untyped-call]
                return
            log.warning("broker.unrestorable bytes=%d reason=%s", len(record), problem)
            dead = self.unacked_key + UNDELIVERABLE_SUFFIX
            pipe = conn.pipeline().lpush(dead, record).ltrim(dead, 0, UNDELIVERABLE_CAP - 1)
            self._remove_from_indices(tag, pipe).execute()  # type: ignore[no-untyped-call]


def _record_problem(channel: Any, record: Any) -> str | None:
    """Why kombu could not restore this unacked record, or None."""
    try:
        message, exchange, routing_key = loads(bytes_to_str(record))  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON to Python"
    if not isinstance(message, dict) or not isinstance(exchange, str) or not isinstance(routing_key, str):
        return "not a kombu record"
    try:
        routed = channel._lookup(exchange, routing_key)
    except Exception as exc:  # a lookup of a hostile exchange name
        return f"no route ({type(exc).__name__})"
    return None if routed else "routed to no queue"


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # kombu is untyped
        self.consumer_id = uuid.uuid4().hex
        self._beat_at = 0.0
        self._swept_at = 0.0
        # The pop in flight: (queue, its lists in priority order, the command sent)
        self._inflight: tuple[str, list[str], str] | None = None
        self._block_next = False  # the last non-blocking pop found nothing: block on the next one
        self._shared: Any = None
        self._warned = False
        self._taken: Taken | None = None  # the entry being delivered
        self._no_ack: set[str] = set()  # queues consumed without acks: the pop records nothing

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("no_ack", args[0] if args else False):
            self._no_ack.add(queue)
        return super().basic_consume(queue, *args, **kwargs)  # type: ignore[no-untyped-call]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new redis client (a costly constructor) for each command it sends
        outside the poll: acks, unacked records, event publishes. One client per connection pool
        serves them all (redis clients are thread-safe over their pool)."""
        if client:
            yield client
            return
        pool = self.pool
        if self._shared is None or self._shared.connection_pool is not pool:
            self._shared = self._create_client()  # type: ignore[no-untyped-call]  # kombu is untyped
        yield self._shared

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if len(queues) != 1:
            if queues and not self._warned:
                log.warning("broker.unsafe_pop queues=%d (reliable pops need exactly one)", len(queues))
                self._warned = True
            self._inflight = None
            super()._brpop_start(timeout)  # type: ignore[no-untyped-call]
            return
        self._housekeeping()
        queue = queues[0]
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]  # type: ignore[no-untyped-call]
        connection = self.client.connection
        if self._block_next:  # all lists were empty: wait on the plain queue
            wait = self.brpop_timeout if timeout is None else timeout
            command = "BLMOVE"
            connection.send_command(command, keys[0], self._inflight_key(keys[0]), "RIGHT", "LEFT", wait or 0)
        else:  # one round trip: as many entries as the prefetch limit takes, recorded as unacked
            command = "EVAL"
            want = take_count(self.qos.can_consume_max_estimate())
            inflights = [self._inflight_key(key) for key in keys]
            record = "0" if queue in self._no_ack else "1"
            connection.send_command(
                command, _POP, 2 * len(keys) + 2, *keys, *inflights,
                self.unacked_index_key, self.unacked_key, want, time.time(), record,
            )  # fmt: skip
        self._inflight = (queue, keys, command)
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu declares None

    def _inflight_key(self, source: str) -> str:
        return f"{INFLIGHT_PREFIX}{self.consumer_id}:{source}"

    def _brpop_read(self, **options: Any) -> bool:
        if self._inflight is None:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        queue, keys, command = self._inflight
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if command == "EVAL":
                entries = [self._taken_from(keys[int(i) - 1], item, tag) for i, item, tag in reply or ()]
                self._block_next = not entries
            else:
                entries = [self._taken_from(keys[0], reply, None)] if reply else []
                self._block_next = False
            if not entries:
                raise kombu_redis.Empty()  # type: ignore[attr-defined]  # kombu is untyped
            self._queue_cycle.rotate(queue)
            self._deliver_all(queue, entries)
            return True
        finally:
            self._taken = None
            self._in_poll = None  # type: ignore[assignment]  # kombu declares bool

    def _taken_from(self, source: str, item: bytes, tag: bytes | None) -> Taken:
        return Taken(source, self._inflight_key(source), item, tag)

    def _deliver_all(self, queue: str, entries: list[Taken]) -> None:
        """Each entry to kombu, which records it as unacked (QoS.append) and hands it to Celery;
        an entry that is no message to `_undeliverable`. Should a delivery raise (a shutdown
        too), that entry (unless kombu recorded it by then) and the ones after it go back on
        their lists."""
        for n, taken in enumerate(entries):
            message, reason = decode_entry(taken.item)
            try:
                if message is None:
                    self._undeliverable(queue, taken, reason)
                    continue
                self._taken = taken
                self.connection._deliver(message, queue)
            except BaseException:
                recorded = message is not None and self._taken is None  # QoS.append ran
                self._taken = None
                self._give_back(entries[n + 1 :] if recorded else entries[n:])
                raise
            if self._taken is not None:  # a consumer without acks: kombu recorded nothing
                self._taken = None
                self._give_back([taken], requeue=False)

    def _give_back(self, entries: list[Taken], *, requeue: bool = True) -> None:
        """Take `entries` out of the unacked records or in-flight lists and (`requeue`) back onto
        their queues where the next pop takes from, in the order they were popped; one MULTI."""
        if not entries:
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            for taken in reversed(entries):
                self._release(pipe, taken)
                if requeue:
                    pipe.rpush(taken.source, taken.item)
            pipe.execute()

    def _release(self, pipe: Any, taken: Taken) -> None:
        """Queue on `pipe` the removal of the entry from its in-flight list or unacked record."""
        if taken.recorded is None:
            pipe.lrem(taken.inflight, 1, taken.item)
        else:
            pipe.zrem(self.unacked_index_key, taken.recorded).hdel(self.unacked_key, taken.recorded)

    def _undeliverable(self, queue: str, taken: Taken, reason: str) -> None:
        """Hand the worker a `sidecar.undeliverable` task for the entry, then move the entry from
        its in-flight list or unacked record to the queue's capped dead-letter list (a crash in
        between delivers the task again, never loses the entry)."""
        log.warning("broker.undeliverable queue=%s bytes=%d reason=%s", queue, len(taken.item), reason)
        self.connection._deliver(undeliverable_message(queue, taken.item, reason), queue)
        dead = queue + UNDELIVERABLE_SUFFIX
        with self.conn_or_acquire() as client:
            pipe = client.pipeline().lpush(dead, taken.item).ltrim(dead, 0, UNDELIVERABLE_CAP - 1)
            self._release(pipe, taken)
            pipe.execute()

    def _housekeeping(self) -> None:
        """Beat this consumer's heartbeat; now and then give dead consumers' messages back."""
        now = time.monotonic()
        if now - self._beat_at < HEARTBEAT_S:
            return
        self._beat_at = now
        with self.conn_or_acquire() as client:
            client.set(f"{ALIVE_PREFIX}{self.consumer_id}", "1", ex=DEAD_AFTER_S)
            if now - self._swept_at >= SWEEP_S:
                self._swept_at = now
                restore_dead_consumers(client)


def restore_dead_consumers(client: Any) -> int:
    """Put the in-flight messages of consumers that stopped beating back on their queues."""
    restore = client.register_script(_RESTORE)
    moved = 0
    for raw in client.scan_iter(match=f"{INFLIGHT_PREFIX}*", count=100):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        consumer, _, source = key[len(INFLIGHT_PREFIX) :].partition(":")
        moved += int(restore(keys=[key, f"{ALIVE_PREFIX}{consumer}", source]))
    if moved:
        log.warning("broker.restored messages=%d (popped by consumers that died)", moved)
    return moved


class Transport(kombu_redis.Transport):
    Channel = Channel
