"""Debezium change events, as Debezium Server's Redis sink writes them to a stream entry.

`message.format = compact` (the sink's default): one field whose name is the key JSON and whose
value is the value JSON. `extended`: fields `key` and `value`, plus one field per header. Either
JSON may be wrapped as `{"schema": ..., "payload": ...}` (the JSON converter with schemas on) or
not. The value is the change envelope: `op` (`c` create, `r` snapshot read, `u` update, `d`
delete, `t` truncate, `m` message), `before`, `after`, `source`, `ts_ms`. A null value — the
tombstone after a delete — is written as the sink's null value, `default`: ignored.

The version: `source.lsn` (PostgreSQL), else MySQL's binlog file number and position as one
integer (`file number × 2³² + pos`, increasing along the binlog), else `ts_ms`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from worker.capture.accept import Change
from worker.capture.sources import RowRejected

TOMBSTONE = "default"  # the Redis sink's null.key / null.value
BINLOG_FILE = re.compile(r"\.(\d+)$")
UPSERT_OPS = ("c", "r", "u")


def decode_entry(fields: dict[bytes, bytes], position: str, *, snapshot_lane: str | None) -> list[Change]:
    """The changes of one stream entry (none for a tombstone or a message); RowRejected names the
    rule an entry breaks (`entry`, `value`, `op`, `version`)."""
    key_text, value_text = _key_value(fields)
    if value_text is None or value_text.strip() in ("", TOMBSTONE, "null"):
        return []
    value = _unwrap(_json(value_text, "value"))
    if not isinstance(value, dict):
        raise RowRejected("value", "must be a Debezium change event (a JSON object)")
    op = value.get("op")
    if op == "m":
        return []
    if op not in (*UPSERT_OPS, "d", "t"):
        raise RowRejected("op", f"must be one of c, r, u, d, t, m; got {str(op)[:20]!r}")
    version = event_version(value)
    if op == "t":
        return [Change("truncate", version, {}, position)]
    key = _unwrap(_json(key_text, "key")) if key_text and key_text != TOMBSTONE else None
    key_row = key if isinstance(key, dict) else {}
    if op == "d":
        before = value.get("before")
        row = {**(before if isinstance(before, dict) else {}), **key_row}
        if not row:
            raise RowRejected("value", "a delete without `before` or a key")
        return [Change("delete", version, row, position)]
    after = value.get("after")
    if not isinstance(after, dict):
        raise RowRejected("value", f"op {op} needs `after`, a JSON object")
    return [Change("upsert", version, after, position, snapshot_lane if op == "r" else None)]


def event_version(value: dict[str, Any]) -> int:
    """source.lsn, else binlog file and position, else ts_ms; RowRejected when none is usable."""
    given = value.get("source")
    source: dict[str, Any] = given if isinstance(given, dict) else {}
    lsn = _whole(source.get("lsn"))
    if lsn is not None:
        return lsn
    file, pos = source.get("file"), _whole(source.get("pos"))
    if isinstance(file, str) and pos is not None and (match := BINLOG_FILE.search(file)):
        return (int(match.group(1)) << 32) + pos
    for ts in (value.get("ts_ms"), source.get("ts_ms")):
        if (whole := _whole(ts)) is not None:
            return whole
    raise RowRejected("version", "no source.lsn, binlog file and pos, or ts_ms")


def _key_value(fields: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    """(key JSON, value JSON) of either message format."""
    text = {_text(k): _text(v) for k, v in fields.items()}
    if "value" in text:  # extended: key, value and one field per header
        return text.get("key"), text["value"]
    if len(text) == 1:  # compact: {key JSON: value JSON}
        ((key, value),) = text.items()
        return key, value
    raise RowRejected("entry", "neither the compact (one field) nor the extended (key, value) format")


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowRejected("entry", "not UTF-8") from exc


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RowRejected(field, "not JSON") from exc


def _unwrap(value: Any) -> Any:
    """The payload of the JSON converter's `{"schema", "payload"}` wrapper; the value itself else."""
    if isinstance(value, dict) and set(value) == {"schema", "payload"}:
        return value["payload"]
    return value


def _whole(value: Any) -> int | None:
    """A non-negative integer, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
