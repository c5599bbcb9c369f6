"""Broker queue entries that are no kombu message: how they are recognised, and the task
`sidecar.undeliverable` each becomes, on Redis (worker/broker.py) and on the embedded SQLite
broker (worker/embedded_broker.py) alike."""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import uuid
from typing import Any

UNDELIVERABLE_TASK = "sidecar.undeliverable"
RAW_CHARS = 4096
MAX_TAKE = 16  # entries one pop or take may hand out (fewer when the prefetch limit leaves less room)


def take_count(room: int | None) -> int:
    """How many entries one pop or take may hand out, given the room the prefetch limit leaves
    (None: no limit); at least one, so that a consumer with no room still makes progress once
    kombu asks (it asks only when it can take one)."""
    return MAX_TAKE if room is None else max(1, min(MAX_TAKE, room))


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
