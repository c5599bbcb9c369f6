"""A Redis transport for Celery that loses no message when a worker is killed, and is stopped by
no queue entry.

kombu's Redis transport takes a message off its queue with BRPOP and records it as unacked only
after it has read the reply. A worker killed in between loses the message: a large process
keeps its sockets open for a while as it tears down, and Redis hands it whatever arrives
(kombu#305, celery#7924; seen in `bench.chaos` as events published just after a SIGKILL). This
transport pops with BLMOVE into an in-flight list of its own consumer instead, and removes the
message from there in the MULTI that records it as unacked (from where the visibility timeout
restores it; `QoS.append`). Any live consumer moves the in-flight lists of consumers whose heartbeat
has expired back onto their queues. A message may so be delivered twice, never lost; the
ingest tasks are idempotent.

Priorities: kombu keeps a queue's messages of priority 3, 6 and 9 (its `priority_steps`) in
sub-lists (`queue\\x06\\x163` ...; on Redis a lower number goes first). Each pop takes from the first
non-empty list, in that order, in one Lua call (one round trip), and blocks on the plain queue
when all are empty (a message that lands in a sub-list meanwhile waits at most one poll,
`brpop_timeout`). kombu's other commands (acks, unacked records, event publishes) share one
redis client instead of building one per command.

An entry that is not a kombu message (not UTF-8, not JSON, JSON of another shape, or a message
whose body is not JSON, which Celery would drop without a trace) is moved
to `<queue>.undeliverable` (capped at UNDELIVERABLE_CAP entries) and handed to the worker as a
task `sidecar.undeliverable` with one argument `{"queue", "raw", "reason"}`, `raw` being the
entry as JSON-escaped text of at most RAW_CHARS characters, so that it is recorded and the
consumer goes on with the next entry.

Limit: one queue per consumer (the worker consumes the one queue the sidecar uses); with more,
pops fall back to kombu's BRPOP.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

INFLIGHT_PREFIX = "sidecar:inflight:"  # + consumer id (32 hex) + ":" + queue key
ALIVE_PREFIX = "sidecar:consumer:"  # + consumer id; expires when the consumer stops beating
HEARTBEAT_S = 5.0
DEAD_AFTER_S = 30
SWEEP_S = 10.0
UNDELIVERABLE_TASK = "sidecar.undeliverable"
UNDELIVERABLE_SUFFIX = ".undeliverable"
UNDELIVERABLE_CAP = 10_000
RAW_CHARS = 4096

# Move a dead consumer's in-flight messages back to the end of the queue that is popped next.
_RESTORE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[3], 'RIGHT', 'RIGHT') do n = n + 1 end
return n
"""


# Move the last entry of the first non-empty list among KEYS[1..n] onto its in-flight list
# KEYS[n+i]; {i, entry}, or false when all are empty (the consumer then blocks on the plain queue).
_POP = """
local n = #KEYS / 2
for i = 1, n do
  local item = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'RIGHT', 'LEFT')
  if item then return {i, item} end
end
return false
"""


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        """Record `message` as unacked and, for the entry being delivered, take it off its
        consumer's in-flight list in the same MULTI (one round trip, and never in neither)."""
        taken, self.channel._taken = self.channel._taken, None
        if taken is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu is untyped
            return
        inflight, item = taken
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag, record
            ).lrem(inflight, 1, item).execute()
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]  # the in-process record


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
        self._taken: tuple[str, bytes] | None = None  # (in-flight list, entry) being delivered

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
        else:  # one round trip: the first non-empty list's entry, or nothing
            command = "EVAL"
            inflights = [self._inflight_key(key) for key in keys]
            connection.send_command(command, _POP, 2 * len(keys), *keys, *inflights)
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
                self._block_next = not reply
                source, item = (keys[int(reply[0]) - 1], reply[1]) if reply else (keys[0], None)
            else:
                self._block_next = False
                source, item = keys[0], reply
            if not item:
                raise kombu_redis.Empty()  # type: ignore[attr-defined]  # kombu is untyped
            inflight = self._inflight_key(source)
            self._queue_cycle.rotate(queue)
            message, reason = decode_entry(item)
            if message is None:
                self._undeliverable(queue, inflight, item, reason)
                return True
            # kombu records it as unacked (QoS.append, which also takes it off the in-flight
            # list, in the same MULTI), then hands it to Celery
            self._taken = (inflight, item)
            try:
                self.connection._deliver(message, queue)
            except Exception:
                if self._taken is not None:  # not recorded: back on the queue
                    with self.conn_or_acquire() as client:
                        client.pipeline().lrem(inflight, 1, item).rpush(source, item).execute()
                raise
            if self._taken is not None:  # a consumer without acks: nothing was recorded
                with self.conn_or_acquire() as client:
                    client.lrem(inflight, 1, item)
            return True
        finally:
            self._taken = None
            self._in_poll = None  # type: ignore[assignment]  # kombu declares bool

    def _undeliverable(self, queue: str, inflight: str, item: bytes, reason: str) -> None:
        """Hand the worker a `sidecar.undeliverable` task for the entry, then move the entry from
        the in-flight list to the queue's capped dead-letter list (a crash in between delivers
        the task again, never loses the entry)."""
        log.warning("broker.undeliverable queue=%s bytes=%d reason=%s", queue, len(item), reason)
        self.connection._deliver(undeliverable_message(queue, item, reason), queue)
        dead = queue + UNDELIVERABLE_SUFFIX
        with self.conn_or_acquire() as client:
            client.pipeline().lpush(dead, item).ltrim(dead, 0, UNDELIVERABLE_CAP - 1).lrem(
                inflight, 1, item
            ).execute()

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


def decode_entry(item: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the kombu message, "") of a queue entry, or (None, why it is not one)."""
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        message = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON ({type(exc).__name__})"
    except RecursionError:
        return None, "not JSON (nested too deeply)"
    problem = envelope_problem(message)
    return (None, f"not a kombu message: {problem}") if problem else (message, "")


def envelope_problem(message: Any) -> str | None:
    """What keeps kombu from delivering this decoded entry, or None."""
    if not isinstance(message, dict):
        return "not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "no properties"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), str) for k in ("exchange", "routing_key")
    ):
        return "no delivery_info with exchange and routing_key"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no delivery_tag"
    if not isinstance(message.get("headers", {}), dict):
        return "headers is not an object"
    body, encoding = message.get("body"), properties.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return "body is not a string"
    if encoding not in (None, "utf-8", "base64"):
        return f"unknown body_encoding {str(encoding)[:32]!r}"
    return body_problem(message.get("content-type"), body or "", encoding)


def body_problem(content_type: Any, body: str, encoding: Any) -> str | None:
    """What keeps Celery from decoding the message's body as JSON, or None. Celery drops such a
    message with no trace (its decode-error hook acks it), so it is caught here instead."""
    if content_type != "application/json":
        return f"content type {str(content_type)[:64]!r} is not application/json"
    try:
        data = base64.b64decode(body, validate=True) if encoding == "base64" else body.encode()
        json.loads(data)
    except (binascii.Error, UnicodeError):
        return "body is not base64 of UTF-8"
    except ValueError as exc:
        return f"body is not JSON ({type(exc).__name__})"
    except RecursionError:
        return "body is not JSON (nested too deeply)"
    return None


def undeliverable_message(queue: str, item: bytes, reason: str) -> dict[str, Any]:
    """A kombu message of Celery task `sidecar.undeliverable` about one queue entry."""
    raw = json.dumps(item.decode("utf-8", errors="replace"), ensure_ascii=True)[:RAW_CHARS]
    task_id = str(uuid.uuid4())
    argument = {"queue": queue, "raw": raw, "reason": reason}
    body = json.dumps([[argument], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": UNDELIVERABLE_TASK,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
            "argsrepr": f"(<an undeliverable entry of {len(item)} bytes from {queue!r}>,)",
            "kwargsrepr": "{}",
            "origin": f"{os.getpid()}@{socket.gethostname()}",
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


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
