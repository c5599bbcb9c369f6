"""The event contract (README.md, "Using it"): an `Event`, or InvalidEvent naming field and rule.

Whatever passes here can be stored as is on SQLite and PostgreSQL alike: no string holds a NUL
character or a lone UTF-16 surrogate, names match `NAME_PATTERN` in full, a version leaves room
for the next version-less event, and metadata is plain, finite, shallow JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from worker.errors import InvalidEvent

if TYPE_CHECKING:
    from worker.settings import Settings

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # collection and tenant; always matched in full
FIELDS = frozenset(
    {"op", "doc_id", "collection", "version", "text", "metadata", "tenant", "event_id", "lane"}
)
LANES = ("realtime", "batch")  # DESIGN.md §7: the Batch API at half price, or the real-time API
# Vector stores compare payload versions as doubles (Qdrant's range filters), exact up to 2**53:
# above that a version guard could let a stale chunk stand. version + 1 (the next version-less
# event's) stays within the exact range too.
MAX_VERSION = 2**53 - 2
MAX_DOC_ID_CHARS = 512
MAX_EVENT_ID_CHARS = 256
MAX_METADATA_DEPTH = 32
_NAME = re.compile(NAME_PATTERN)
_INT64 = range(-(2**63), 2**63)


@dataclass(frozen=True)
class Event:
    op: Literal["upsert", "delete"]
    doc_id: str
    collection: str
    tenant: str
    version: int | None
    text: str | None
    metadata: dict[str, Any] | None
    event_id: str | None
    lane: Literal["realtime", "batch"] = "realtime"


def parse_event(
    raw: Any,
    *,
    default_collection: str,
    default_tenant: str,
    max_text_bytes: int,
    max_metadata_bytes: int,
) -> Event:
    """Validate one event; the first broken rule raises InvalidEvent(field, rule)."""
    if not isinstance(raw, dict):
        raise InvalidEvent("event", f"must be a JSON object, got {type(raw).__name__}")
    _check_fields(raw)
    op = _op(raw)
    return Event(
        op=op,
        doc_id=_doc_id(raw),
        collection=_name(raw, "collection", default_collection),
        tenant=_name(raw, "tenant", default_tenant),
        version=_version(raw),
        text=_text(raw, op, max_text_bytes),
        metadata=_metadata(raw, max_metadata_bytes),
        event_id=_event_id(raw),
        lane=_lane(raw),
    )


def parse_with(raw: Any, settings: Settings) -> Event:
    """`parse_event` with the defaults and caps of `settings` (every caller's case)."""
    return parse_event(
        raw,
        default_collection=settings.default_collection,
        default_tenant=settings.default_tenant,
        max_text_bytes=settings.max_text_bytes,
        max_metadata_bytes=settings.max_metadata_bytes,
    )


def escape_unstorable(value: str, max_chars: int) -> str:
    """`value` with NUL and lone surrogates written as `\\u0000`/`\\ud800` escapes, cut to `max_chars`.

    Both databases can hold the result; text that needed no escape is kept as it was."""
    if "\x00" in value:
        value = value.replace("\x00", "\\u0000")
    if unstorable(value):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value[:max_chars]


def unstorable(value: str) -> str | None:
    """Why a database cannot hold `value` (NUL, lone surrogates), or None when it can."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


# --- one function per field -------------------------------------------------------------------


def _check_fields(raw: dict[Any, Any]) -> None:
    unknown = sorted(str(key) for key in raw if key not in FIELDS)
    if unknown:
        field = escape_unstorable(unknown[0], 64) or '""'
        raise InvalidEvent(field, f"unknown field; allowed: {', '.join(sorted(FIELDS))}")


def _op(raw: dict[str, Any]) -> Literal["upsert", "delete"]:
    op = raw.get("op")
    if op == "upsert":
        return "upsert"
    if op == "delete":
        return "delete"
    raise InvalidEvent("op", 'required; must be "upsert" or "delete"')


def _doc_id(raw: dict[str, Any]) -> str:
    doc_id = raw.get("doc_id")
    if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= MAX_DOC_ID_CHARS:
        raise InvalidEvent("doc_id", f"required; a string of 1 to {MAX_DOC_ID_CHARS} characters")
    _storable("doc_id", doc_id)
    return doc_id


def _name(raw: dict[str, Any], field: str, default: str) -> str:
    value = raw.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidEvent(field, f"must match {NAME_PATTERN}")
    return value


def _version(raw: dict[str, Any]) -> int | None:
    version = raw.get("version")
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise InvalidEvent("version", f"an integer from 0 to {MAX_VERSION}")
    return version


def _text(raw: dict[str, Any], op: str, max_bytes: int) -> str | None:
    text = raw.get("text")
    if op == "delete":
        if text is not None:
            raise InvalidEvent("text", "not allowed with op delete")
        return None
    if not isinstance(text, str):
        raise InvalidEvent("text", "required for upsert; a string")
    _storable("text", text)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidEvent("text", f"{size} bytes of UTF-8 is over the cap of {max_bytes}")
    return text


def _metadata(raw: dict[str, Any], max_bytes: int) -> dict[str, Any] | None:
    metadata = raw.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidEvent("metadata", "must be a JSON object")
    problem = json_problem(metadata)
    if problem is not None:
        raise InvalidEvent("metadata", problem)
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if size > max_bytes:
        raise InvalidEvent("metadata", f"{size} bytes of JSON is over the cap of {max_bytes}")
    return metadata


def _event_id(raw: dict[str, Any]) -> str | None:
    event_id = raw.get("event_id")
    if event_id is None:
        return None
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_EVENT_ID_CHARS:
        raise InvalidEvent("event_id", f"a string of 1 to {MAX_EVENT_ID_CHARS} characters")
    _storable("event_id", event_id)
    return event_id


def _lane(raw: dict[str, Any]) -> Literal["realtime", "batch"]:
    lane = raw.get("lane")
    if lane is None or lane == "realtime":
        return "realtime"
    if lane == "batch":
        return "batch"
    raise InvalidEvent("lane", 'must be "realtime" or "batch"')


def _storable(field: str, value: str) -> None:
    problem = unstorable(value)
    if problem is not None:
        raise InvalidEvent(field, problem)


def json_problem(value: Any) -> str | None:
    """Why `value` is not plain JSON both databases (and Qdrant) can hold, or None.

    Walks without recursion, so no nesting can exhaust the stack before the depth rule fires."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            problem = _scalar_problem(item)
            if problem is not None:
                return problem
            continue
        if depth > MAX_METADATA_DEPTH:
            return f"nested deeper than {MAX_METADATA_DEPTH} levels"
        if isinstance(item, dict):
            if not all(isinstance(k, str) and unstorable(k) is None for k in item):
                return "keys must be strings without NUL characters or lone surrogates"
            item = list(item.values())
        stack.extend((child, depth + 1) for child in item)
    return None


def _scalar_problem(item: Any) -> str | None:
    if item is None or isinstance(item, bool):
        return None
    if isinstance(item, str):
        return (
            None if unstorable(item) is None else "strings must not contain NUL characters or lone surrogates"
        )
    if isinstance(item, float):
        return None if math.isfinite(item) else "numbers must be finite (no NaN or Infinity)"
    if isinstance(item, int):
        return None if item in _INT64 else "integers must fit in 64 bits"
    return f"must be plain JSON, not {type(item).__name__}"
