"""A decoder of PostgreSQL's `pgoutput` messages, protocol version 1 (PostgreSQL ≥ 10), into changes.

The format is PostgreSQL's "Logical Replication Message Formats" (protocol chapter): one message
per XLogData payload, its first byte the kind. Only what a capture of one table needs is kept:
Begin (B), Commit (C), Relation (R), Insert (I), Update (U), Delete (D), Truncate (T); Origin (O),
Type (Y) and logical decoding messages (M) are read past. Column values arrive in text form (or
`n` for NULL and `u` for an unchanged TOASTed value, which becomes UNCHANGED); `typed` turns the
text of the common types into Python values, the same way for snapshot rows (read as `::text`),
so that a row read either way gives the same event, byte for byte.

Why a decoder of our own (README, change capture): psycopg 3 has no replication protocol; psycopg2's
LogicalReplicationConnection carries the stream but does not decode pgoutput; the Python
decoders on PyPI (pypgoutput 0.0.3, 2022; pypg-cdc 0.0.1) are unmaintained single releases.
The format is small, fixed per protocol version and documented field by field.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from worker.capture.sources import UNAVAILABLE

UNCHANGED = UNAVAILABLE  # an unchanged TOASTed column: no value sent
PG_EPOCH_UNIX_S = 946_684_800  # 2000-01-01 UTC
INT_TYPES = {20, 21, 23, 26}  # int8, int2, int4, oid
FLOAT_TYPES = {700, 701}
BOOL_TYPE = 16
JSON_TYPES = {114, 3802}


class DecodeError(ValueError):
    """A message that is not pgoutput protocol 1 as documented."""


@dataclass
class Relation:
    id: int
    schema: str
    name: str
    columns: list[str]
    types: list[int]
    key: list[bool]


@dataclass
class Begin:
    final_lsn: int
    commit_ts_s: float


@dataclass
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_ts_s: float


@dataclass
class RowChange:
    """insert / update / delete of one row: `new` for insert and update, `old` (key or full) else."""

    kind: str
    relation: Relation
    new: dict[str, Any] | None = None
    old: dict[str, Any] | None = None


@dataclass
class Truncate:
    relation_ids: list[int]


@dataclass
class Decoder:
    relations: dict[int, Relation] = field(default_factory=dict)

    def decode(self, payload: bytes) -> Begin | Commit | RowChange | Truncate | Relation | None:
        """One message; None for the kinds a capture does not need."""
        if not payload:
            raise DecodeError("empty message")
        reader = Reader(payload, 1)
        kind = payload[:1]
        if kind == b"B":
            final_lsn, ts_us, _xid = reader.unpack("!qqi")
            return Begin(final_lsn, ts_us / 1e6 + PG_EPOCH_UNIX_S)
        if kind == b"C":
            _flags, commit_lsn, end_lsn, ts_us = reader.unpack("!bqqq")
            return Commit(commit_lsn, end_lsn, ts_us / 1e6 + PG_EPOCH_UNIX_S)
        if kind == b"R":
            return self._relation(reader)
        if kind in (b"I", b"U", b"D"):
            return self._row(kind, reader)
        if kind == b"T":
            (count,) = reader.unpack("!i")
            reader.unpack("!b")  # options: CASCADE, RESTART IDENTITY
            return Truncate([reader.unpack("!i")[0] for _ in range(count)])
        if kind in (b"O", b"Y", b"M"):
            return None
        raise DecodeError(f"unknown message kind {kind!r}")

    def _relation(self, reader: Reader) -> Relation:
        (relation_id,) = reader.unpack("!i")
        schema, name = reader.cstring(), reader.cstring()
        _identity, count = reader.unpack("!bh")
        columns, types, key = [], [], []
        for _ in range(count):
            (flags,) = reader.unpack("!b")
            columns.append(reader.cstring())
            type_oid, _typmod = reader.unpack("!ii")
            types.append(type_oid)
            key.append(bool(flags & 1))
        relation = Relation(relation_id, schema, name, columns, types, key)
        self.relations[relation_id] = relation
        return relation

    def _row(self, kind: bytes, reader: Reader) -> RowChange:
        (relation_id,) = reader.unpack("!i")
        relation = self.relations.get(relation_id)
        if relation is None:
            raise DecodeError(f"row of relation {relation_id} before its Relation message")
        change = RowChange({b"I": "insert", b"U": "update", b"D": "delete"}[kind], relation)
        while reader.remaining():
            marker = reader.take(1)
            tuple_ = self._tuple(relation, reader)
            if marker == b"N":
                change.new = tuple_
            elif marker in (b"K", b"O"):
                change.old = tuple_
            else:
                raise DecodeError(f"unknown tuple marker {marker!r}")
        return change

    def _tuple(self, relation: Relation, reader: Reader) -> dict[str, Any]:
        (count,) = reader.unpack("!h")
        if count != len(relation.columns):
            raise DecodeError(f"tuple of {count} columns for a relation of {len(relation.columns)}")
        row: dict[str, Any] = {}
        for name, type_oid in zip(relation.columns, relation.types, strict=True):
            kind = reader.take(1)
            if kind == b"n":
                row[name] = None
            elif kind == b"u":
                row[name] = UNCHANGED
            elif kind in (b"t", b"b"):
                (length,) = reader.unpack("!i")
                row[name] = typed(reader.take(length).decode("utf-8", "surrogateescape"), type_oid)
            else:
                raise DecodeError(f"unknown column kind {kind!r}")
        return row


class Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.data):
            raise DecodeError("message ends early")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.offset)
        if end < 0:
            raise DecodeError("string without its NUL")
        value = self.data[self.offset : end].decode("utf-8", "surrogateescape")
        self.offset = end + 1
        return value


def typed(text: str, type_oid: int) -> Any:
    """A column's text form as JSON-able Python: integers, floats, booleans and JSON parsed; the
    rest (numeric, dates, text...) kept as PostgreSQL prints it."""
    try:
        if type_oid in INT_TYPES:
            return int(text)
        if type_oid in FLOAT_TYPES:
            value = float(text)
            return value if value == value and value not in (float("inf"), float("-inf")) else text
        if type_oid == BOOL_TYPE:
            return text == "t"
        if type_oid in JSON_TYPES:
            return json.loads(text)
    except ValueError:
        return text
    return text


def lsn_int(lsn: str) -> int:
    """'16/B374D848' → its 64-bit integer."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_str(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
