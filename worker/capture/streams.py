"""A `kind = "debezium"` source: the Redis Stream Debezium Server's Redis sink writes.

One consumer group per source (named after it); this host's consumer first reads what it was
given before and did not acknowledge (a killed capture's entries), takes over entries another
consumer left pending for `capture_claim_idle_s` (XAUTOCLAIM), then reads new entries. A batch
of entries is decoded (worker/capture/debezium.py), committed through the accept path, and only
then acknowledged (XACK). Acknowledged entries are trimmed (XTRIM MINID below the oldest entry
any group still needs): the sink stops writing when Redis passes 85 % of its maxmemory.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import redis

from worker.capture import state
from worker.capture.accept import Change, Rejection, accept_changes, record_rejections, rejection
from worker.capture.debezium import decode_entry
from worker.capture.sources import RowRejected, Source
from worker.runtime import Runtime

log = logging.getLogger(__name__)
MEASURE_EVERY_S = 2.0
Entry = tuple[bytes, dict[bytes, bytes]]


class DebeziumCapture:
    def __init__(self, rt: Runtime, source: Source, *, stop: threading.Event, once: bool = False) -> None:
        assert source.stream is not None and source.redis_url is not None
        self.rt, self.source, self.stop, self.once = rt, source, stop, once
        self.stream, self.group = source.stream, source.name
        self.consumer = socket.gethostname()[:64]
        self.lane = "batch" if rt.settings.capture_snapshot_lane == "batch" else None
        self.batch_rows = rt.settings.capture_batch_rows
        self.client = redis.Redis.from_url(source.redis_url, socket_timeout=30, socket_connect_timeout=10)
        self.measured = 0.0
        self.claimed = 0.0

    def run(self) -> None:
        try:
            self._ensure_group()
            own: str | None = "0"  # this consumer's unacknowledged entries first
            while not self.stop.is_set():
                entries = self._next(own)
                if own is not None and not entries:
                    own = None
                    continue
                if entries:
                    self._accept(entries)
                    if own is not None:
                        own = entries[-1][0].decode()
                else:
                    self._idle()
                    if self.once:
                        break
        finally:
            self.client.close()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _next(self, own: str | None) -> list[Entry]:
        if own is not None:
            return self._read(own, block_ms=None)
        if time.monotonic() - self.claimed >= min(self.rt.settings.capture_claim_idle_s, 30.0):
            self.claimed = time.monotonic()
            idle_ms = int(self.rt.settings.capture_claim_idle_s * 1000)
            answer = self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=idle_ms,
                start_id="0-0",
                count=self.batch_rows,
            )
            claimed = [e for e in answer[1] if e[1] is not None]
            if claimed:
                log.info("capture.claimed source=%s entries=%d", self.source.name, len(claimed))
                return claimed
        return self._read(">", block_ms=None if self.once else int(self.rt.settings.capture_idle_s * 1000))

    def _read(self, start: str, *, block_ms: int | None) -> list[Entry]:
        answer = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch_rows, block=block_ms
        )
        found: list[Any] = list(answer or [])
        return [e for _, entries in found for e in entries if e[1] is not None]

    def _accept(self, entries: list[Entry]) -> None:
        """Decode, commit, record, then XACK (and trim now and then)."""
        changes: list[Change] = []
        rejected: list[Rejection] = []
        for entry_id, fields in entries:
            position = entry_id.decode()
            try:
                changes += decode_entry(fields, position, snapshot_lane=self.lane)
            except RowRejected as exc:
                rejected.append(rejection(self.source, f"entry {position}", position, exc.field, exc.rule))
        record_rejections(self.rt, rejected)
        last = entries[-1][0].decode()
        result = accept_changes(
            self.rt, self.source, changes, message_id=f"capture:{self.source.name}:{last}"
        )
        with self.rt.sessions.begin() as session:
            row = state.source_row(session, self.source.name, "debezium")
            row.phase = "streaming"
            state.record_batch(
                session,
                row,
                rows=len(entries),
                rejected=result.rejected + len(rejected),
                position=last,
                lag_s=self._lag_s(last),
                process=self.rt.process,
            )
        self.client.xack(self.stream, self.group, *[e[0] for e in entries])
        if time.monotonic() - self.measured >= MEASURE_EVERY_S:
            self._idle()

    def _lag_s(self, position: str) -> float:
        """Seconds between the entry just committed and the stream's newest entry (ids are ms)."""
        newest = self.client.xinfo_stream(self.stream).get("last-generated-id", b"0-0")
        newest_ms = int((newest.decode() if isinstance(newest, bytes) else str(newest)).split("-")[0])
        return max(0.0, (newest_ms - int(position.split("-")[0])) / 1000)

    def _idle(self) -> None:
        """Trim what every group acknowledged; record the lag and a heartbeat."""
        self.measured = time.monotonic()
        trim_acknowledged(self.client, self.stream)
        pending = _group(self.client, self.stream, self.group)
        lag_s = 0.0 if not pending.get("lag") and not pending.get("pending") else None
        with self.rt.sessions.begin() as session:
            row = state.source_row(session, self.source.name, "debezium")
            row.phase = "streaming"
            state.heartbeat(session, row, lag_bytes=None, lag_s=lag_s)


def _group(client: redis.Redis, stream: str, name: str) -> dict[str, Any]:
    for group in client.xinfo_groups(stream):
        group_name = group.get("name")
        if (group_name.decode() if isinstance(group_name, bytes) else group_name) == name:
            return dict(group)
    return {}


def trim_acknowledged(client: redis.Redis, stream: str) -> int:
    """XTRIM MINID: drop the entries every consumer group has acknowledged; how many went."""
    floor: tuple[int, int] | None = None
    for group in client.xinfo_groups(stream):
        if group.get("pending"):
            summary = client.xpending(stream, group["name"])
            oldest = _entry_id(summary["min"])
        else:
            ms, seq = _entry_id(group.get("last-delivered-id", b"0-0"))
            oldest = (ms, seq + 1)
        floor = oldest if floor is None else min(floor, oldest)
    if floor is None or floor == (0, 1):
        return 0
    return int(client.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False))


def _entry_id(value: Any) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else str(value)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
