"""A Redis transport for Celery that loses no message when a worker is killed.

kombu's Redis transport takes a message off its queue with BRPOP and records it as unacked only
after it has read the reply. A worker killed in between loses the message: a large process
keeps its sockets open for a while as it tears down, and Redis hands it whatever arrives
(kombu#305, celery#7924; seen in `bench.chaos` as events published just after a SIGKILL). This
transport pops with BLMOVE into an in-flight list of its own consumer instead, and removes the
message from there only once kombu has recorded it as unacked (from where the visibility
timeout restores it). Any live consumer moves the in-flight lists of consumers whose heartbeat
has expired back onto their queues. A message may so be delivered twice, never lost; the
ingest tasks are idempotent.

Limits: one queue per consumer, and no message priorities (`priority_steps` is [0]); the worker
consumes the one queue the sidecar uses.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger(__name__)

INFLIGHT_PREFIX = "sidecar:inflight:"  # + consumer id (32 hex) + ":" + queue key
ALIVE_PREFIX = "sidecar:consumer:"  # + consumer id; expires when the consumer stops beating
HEARTBEAT_S = 5.0
DEAD_AFTER_S = 30
SWEEP_S = 10.0

# Move a dead consumer's in-flight messages back to the end of the queue that is popped next.
_RESTORE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[3], 'RIGHT', 'RIGHT') do n = n + 1 end
return n
"""


class Channel(kombu_redis.Channel):
    priority_steps = [0]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumer_id = uuid.uuid4().hex
        self._beat_at = 0.0
        self._swept_at = 0.0
        self._inflight: tuple[str, str] | None = None  # (queue, in-flight key) of the pending pop
        self._warned = False

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if len(queues) != 1:
            if queues and not self._warned:
                log.warning("broker.unsafe_pop queues=%d (reliable pops need exactly one)", len(queues))
                self._warned = True
            self._inflight = None
            super()._brpop_start(timeout)
            return
        self._housekeeping()
        queue = queues[0]
        source = self._q_for_pri(queue, 0)
        inflight = f"{INFLIGHT_PREFIX}{self.consumer_id}:{source}"
        self._inflight = (queue, inflight)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        wait = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMOVE", source, inflight, "RIGHT", "LEFT", wait or 0)

    def _brpop_read(self, **options: Any) -> bool:
        if self._inflight is None:
            return super()._brpop_read(**options)
        queue, inflight = self._inflight
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not item:
                raise kombu_redis.Empty()
            self._queue_cycle.rotate(queue)
            try:
                message = loads(bytes_to_str(item))
            except ValueError:
                log.error("broker.undecodable_message queue=%s dropped", queue)
            else:
                try:
                    self.connection._deliver(message, queue)  # kombu records it as unacked here
                except Exception:
                    with self.conn_or_acquire() as client:  # not recorded: back on the queue
                        client.pipeline().lrem(inflight, 1, item).rpush(
                            self._q_for_pri(queue, 0), item
                        ).execute()
                    raise
            with self.conn_or_acquire() as client:
                client.lrem(inflight, 1, item)
            return True
        finally:
            self._in_poll = None

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
        key = bytes_to_str(raw)
        consumer, _, source = key[len(INFLIGHT_PREFIX) :].partition(":")
        moved += int(restore(keys=[key, f"{ALIVE_PREFIX}{consumer}", source]))
    if moved:
        log.warning("broker.restored messages=%d (popped by consumers that died)", moved)
    return moved


class Transport(kombu_redis.Transport):
    Channel = Channel
