"""The event contract of DESIGN §2: validation into an `Event`, or InvalidEvent naming field and rule."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from worker.errors import InvalidEvent

if TYPE_CHECKING:
    from worker.settings import Settings

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FIELDS = {"op", "doc_id", "collection", "version", "text", "metadata", "tenant", "event_id"}
MAX_VERSION = 2**63 - 1


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
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise InvalidEvent(unknown[0], f"unknown field; allowed: {', '.join(sorted(_FIELDS))}")

    op = raw.get("op")
    if op not in ("upsert", "delete"):
        raise InvalidEvent("op", 'required; must be "upsert" or "delete"')

    doc_id = raw.get("doc_id")
    if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= 512:
        raise InvalidEvent("doc_id", "required; a string of 1 to 512 characters")
    if "\x00" in doc_id:
        raise InvalidEvent("doc_id", "must not contain NUL characters")

    collection = _name(raw, "collection", default_collection)
    tenant = _name(raw, "tenant", default_tenant)

    version = raw.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION
    ):
        raise InvalidEvent("version", f"an integer from 0 to {MAX_VERSION}")

    text = raw.get("text")
    if op == "upsert":
        if not isinstance(text, str):
            raise InvalidEvent("text", "required for upsert; a string")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidEvent("text", "must be valid Unicode (no lone surrogates)") from None
        if size > max_text_bytes:
            raise InvalidEvent("text", f"{size} bytes of UTF-8 is over the cap of {max_text_bytes}")
        if "\x00" in text:
            raise InvalidEvent("text", "must not contain NUL characters")
    elif text is not None:
        raise InvalidEvent("text", "not allowed with op delete")

    metadata = raw.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidEvent("metadata", "must be a JSON object")
        try:
            encoded = json.dumps(metadata, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise InvalidEvent("metadata", f"must be plain JSON ({exc})") from None
        if len(encoded) > max_metadata_bytes:
            raise InvalidEvent(
                "metadata", f"{len(encoded)} bytes of JSON is over the cap of {max_metadata_bytes}"
            )

    event_id = raw.get("event_id")
    if event_id is not None and (not isinstance(event_id, str) or not 1 <= len(event_id) <= 256):
        raise InvalidEvent("event_id", "a string of 1 to 256 characters")

    return Event(op, doc_id, collection, tenant, version, text, metadata, event_id)


def parse_with(raw: Any, settings: Settings) -> Event:
    """`parse_event` with the defaults and caps of `settings` (every caller's case)."""
    return parse_event(
        raw,
        default_collection=settings.default_collection,
        default_tenant=settings.default_tenant,
        max_text_bytes=settings.max_text_bytes,
        max_metadata_bytes=settings.max_metadata_bytes,
    )


def _name(raw: dict[str, Any], field: str, default: str) -> str:
    value = raw.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidEvent(field, "must match ^[A-Za-z0-9_-]{1,64}$")
    return value
