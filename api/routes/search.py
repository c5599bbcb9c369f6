"""GET /v1/search: the nearest chunks to a text, through worker/search.py's `Searcher`.

The app holds a Searcher when it was given the worker's runtime (`sidecar serve`) or built its
own on a Qdrant server; otherwise (the embedded store belongs to the worker process) it answers
503 with the reason. Errors map to statuses: a broken parameter 422 naming it, no such collection
404, a budget cap or the rate limit 429, anything transient 503; each says why.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from api.auth import can_read
from api.schemas import Message, Name, SearchAnswer, Text
from worker import search
from worker.errors import (
    AccountError,
    ConfigError,
    GiveUp,
    InputRejected,
    InvalidQuery,
    NoSuchCollection,
    ProviderThrottled,
    RetryLater,
    SidecarError,
)
from worker.ledger.budget import BudgetExceeded

router = APIRouter()

NO_STORE = "the embedded store is held by the worker: run `sidecar serve`"


def get_searcher(request: Request) -> search.Searcher:
    found: search.Searcher | None = getattr(request.app.state, "searcher", None)
    if found is None:
        reason = getattr(request.app.state, "search_unavailable", None) or NO_STORE
        raise HTTPException(503, f"search is not available in this process: {reason}")
    return found


def parse_filter(raw: str | None) -> dict[str, Any] | None:
    """The `filter` parameter: a JSON object of meta key → string, integer or boolean."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        _invalid("filter", "must be a JSON object")
    if not isinstance(meta, dict):
        _invalid("filter", "must be a JSON object")
    return meta


def _invalid(field: str, rule: str) -> NoReturn:
    raise HTTPException(422, [{"loc": ["query", field], "msg": rule, "type": "value_error"}])


def _retry_after(exc: SidecarError) -> dict[str, str]:
    seconds = getattr(exc, "retry_after_s", None)
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds else {}


def refusal(exc: SidecarError) -> HTTPException:
    """The HTTP answer to an error of the search (worker/errors.py's tree)."""
    if isinstance(exc, InvalidQuery):
        return HTTPException(422, [{"loc": ["query", exc.field], "msg": exc.rule, "type": "value_error"}])
    if isinstance(exc, NoSuchCollection):
        return HTTPException(404, str(exc))
    if isinstance(exc, BudgetExceeded):
        return HTTPException(429, f"budget: {exc}", headers=_retry_after(exc))
    if isinstance(exc, ProviderThrottled):
        return HTTPException(429, f"rate limited: {exc}", headers=_retry_after(exc))
    if isinstance(exc, InputRejected):
        return HTTPException(422, [{"loc": ["query", "q"], "msg": f"the provider refused the text: {exc}"}])
    if isinstance(exc, RetryLater | AccountError | ConfigError | GiveUp):
        return HTTPException(503, f"{type(exc).__name__}: {exc}", headers=_retry_after(exc))
    return HTTPException(503, type(exc).__name__)


@router.get(
    "/v1/search",
    dependencies=[Depends(can_read)],
    summary="The chunks nearest to a text",
    response_model=SearchAnswer,
    responses={
        404: {"model": Message, "description": "the collection holds no indexed documents"},
        429: {"model": Message, "description": "a budget cap or the rate limit; see Retry-After"},
        503: {"model": Message, "description": "no store in this process, or the provider or store is down"},
    },
)
def get_search(
    q: Annotated[Text, Query(min_length=1, max_length=search.MAX_QUERY_CHARS, description="the text")],
    collection: Annotated[Name | None, Query(description="default: SIDECAR_DEFAULT_COLLECTION")] = None,
    limit: Annotated[int, Query(ge=1, le=search.MAX_LIMIT)] = 10,
    tenant: Annotated[Name | None, Query()] = None,
    meta_filter: Annotated[
        str | None,
        Query(
            alias="filter",
            max_length=4096,
            description='a JSON object of meta key → value, e.g. {"lang": "en"}',
        ),
    ] = None,
    searcher: search.Searcher = Depends(get_searcher),
) -> dict[str, Any]:
    """Embeds `q` as a query (cached in this process: a repeated query costs nothing), then the
    `limit` nearest chunks of `collection`, only `tenant`'s when given, matching `filter`."""
    meta = parse_filter(meta_filter)
    name = collection or searcher.rt.settings.default_collection
    try:
        result = searcher.search(name, q, limit=limit, tenant=tenant, meta=meta)
    except SidecarError as exc:
        raise refusal(exc) from exc
    return result.as_json()
