"""The HTTP API's shapes: parameter types, the budget cap body and the documented responses.

Names, groupings, request statuses and budget periods come from `worker`; these types apply them
at the HTTP edge and show them in the OpenAPI document. An event's rules are in worker/events.py
alone: the events body is documented as a JSON object (or a list of them) and checked there.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Query
from pydantic import AfterValidator, BaseModel, Field, GetCoreSchemaHandler, WithJsonSchema
from pydantic_core import CoreSchema, core_schema

from worker.events import NAME_PATTERN
from worker.ledger.budget import Period
from worker.ledger.reports import REQUEST_STATUSES
from worker.ledger.spending import GROUPINGS

CNY_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"


def as_utc(at: dt.datetime) -> dt.datetime:
    """An aware instant in UTC; a naive one is taken to be UTC already. ValueError when the instant
    has no UTC time (out of range once its offset is applied)."""
    try:
        return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{at.isoformat()} is out of range in UTC") from None


def _check_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _json_schema_pattern(pattern: str) -> str:
    """`pattern` for JSON Schema (ECMA 262): no `\\Z` there, and its `$` already means the end."""
    return pattern.replace(r"\Z", "$")


def _check_name(value: str) -> str:
    if re.fullmatch(NAME_PATTERN, value) is None:
        raise ValueError(f"must match {_json_schema_pattern(NAME_PATTERN)}")
    return value


@dataclass(frozen=True)
class OneOf:
    """`Annotated[str, OneOf(choices)]`: one of `choices` (an enum in the OpenAPI document)."""

    choices: tuple[str, ...]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.literal_schema(list(self.choices))


Name = Annotated[
    str,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": _json_schema_pattern(NAME_PATTERN)}),
]
Grouping = Annotated[str, OneOf(GROUPINGS)]
RequestStatus = Annotated[str, OneOf(REQUEST_STATUSES)]
Text = Annotated[str, AfterValidator(_check_text)]  # PostgreSQL text cannot hold NUL
Instant = Annotated[dt.datetime, AfterValidator(as_utc)]
Since = Annotated[Instant | None, Query(description="from this instant (ISO 8601; UTC when no offset)")]
Until = Annotated[Instant | None, Query(description="up to, not including, this instant")]


class CapIn(BaseModel):
    period: Period
    collection: Name | None = Field(None, description="null: all collections")
    limit_cny: str | None = Field(
        description="CNY as a decimal string; null: no cap for this scope", pattern=CNY_PATTERN
    )


class AcceptedEvent(BaseModel):
    index: int
    doc_id: str
    collection: str


class EventsAccepted(BaseModel):
    accepted: int
    task_id: str
    events: list[AcceptedEvent]


class EventProblem(BaseModel):
    index: int | None = Field(
        description="position in the posted list (0 for a single event); null: the body"
    )
    field: str
    rule: str


class EventProblems(BaseModel):
    detail: list[EventProblem]


class Message(BaseModel):
    detail: str


_EVENT = {
    "type": "object",
    "description": "One event, the object producers send to the `sidecar.ingest` task. Its fields and "
    "rules are the event contract (README, 'Using it'); a broken rule answers 422 naming the field.",
}
EVENTS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [_EVENT, {"type": "array", "items": _EVENT, "minItems": 1}]}
            }
        },
    }
}


def body_problem(rule: str) -> list[dict[str, Any]]:
    """The problem list of a body that is refused as a whole (index null, field `body`)."""
    return [{"index": None, "field": "body", "rule": rule}]


class SearchHit(BaseModel):
    doc_id: str
    chunk_index: int
    score: float
    version: int
    text: str | None = Field(description="the chunk (null when SIDECAR_STORE_TEXT is off)")
    meta: dict[str, Any]


class SearchAnswer(BaseModel):
    hits: list[SearchHit]
    request_id: str | None = Field(
        description="the ledger row (GET /v1/requests) of the query's embedding call; null when cached"
    )
    cached: bool = Field(description="the query's embedding came from this process's cache: no call, no cost")
