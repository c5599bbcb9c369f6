"""What was spent in a time window, overall and per collection, for the budget caps.

Spent = the cost of succeeded requests + the estimated cost (est_tokens at the model's price) of
requests `sent` or of `unknown` outcome, all by `created_at`. A request's cost counts towards a
collection in proportion to the est_tokens of its items in that collection (integer nano-CNY,
rounded down); a request that served no document (a search query) counts in full towards the
collection its row names.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import MODELS
from worker.ledger import rollups
from worker.sql.models import Document, ProviderRequest, RequestItem


def _price_per_token_nano() -> sa.ColumnElement[int]:
    prices = {name: spec.cost_nano_cny(1) for name, spec in MODELS.items()}
    return sa.case(
        *((ProviderRequest.model == name, price) for name, price in prices.items()),
        else_=max(prices.values()),
    )


def request_cost_nano() -> sa.ColumnElement[int]:
    """Cost of one ledger row for the budget: billed cost, or the estimate while not known."""
    return sa.case(
        (ProviderRequest.status == "succeeded", sa.func.coalesce(ProviderRequest.cost_nano_cny, 0)),
        (
            ProviderRequest.status.in_(("sent", "unknown")),
            sa.cast(ProviderRequest.est_tokens, sa.BigInteger) * _price_per_token_nano(),
        ),
        else_=sa.func.coalesce(ProviderRequest.cost_nano_cny, 0),
    )


def in_window(start: dt.datetime, end: dt.datetime) -> sa.ColumnElement[bool]:
    return sa.and_(ProviderRequest.created_at >= start, ProviderRequest.created_at < end)


def spent_overall(session: Session, start: dt.datetime, end: dt.datetime) -> int:
    """The window's spend; from the hourly roll-ups (worker/ledger/rollups.py, O(hours)) when the
    window is whole UTC hours, as a budget's day or month is, else by summing its ledger rows."""
    if rollups.whole_hours(start, end):
        return rollups.spent_overall(session, start, end)
    return int(
        session.execute(
            sa.select(sa.func.coalesce(sa.func.sum(request_cost_nano()), 0)).where(in_window(start, end))
        ).scalar_one()
    )


def spent_by_collection(
    session: Session, start: dt.datetime, end: dt.datetime, collections: set[str]
) -> dict[str, int]:
    """Each collection's share of the window's spend, by the est_tokens of its items (rounded down),
    plus the requests of no item (queries) that name it."""
    if not collections:
        return {}
    per = (
        sa.select(
            ProviderRequest.id.label("request_id"),
            request_cost_nano().label("cost"),
            Document.collection.label("collection"),
            sa.func.sum(RequestItem.est_tokens).label("tokens"),
        )
        .join(RequestItem, RequestItem.request_id == ProviderRequest.id)
        .join(Document, Document.id == RequestItem.document_id)
        .where(in_window(start, end))
        .group_by(
            ProviderRequest.id,
            ProviderRequest.status,
            ProviderRequest.cost_nano_cny,
            ProviderRequest.est_tokens,
            ProviderRequest.model,
            Document.collection,
        )
        .subquery()
    )
    shares = sa.select(
        per.c.collection,
        per.c.cost,
        per.c.tokens,
        sa.func.sum(per.c.tokens).over(partition_by=per.c.request_id).label("total"),
    ).subquery()
    share = sa.cast(shares.c.cost, sa.BigInteger) * shares.c.tokens / sa.func.nullif(shares.c.total, 0)
    rows = session.execute(
        sa.select(shares.c.collection, sa.func.coalesce(sa.func.sum(share), 0))
        .where(shares.c.collection.in_(sorted(collections)))
        .group_by(shares.c.collection)
    ).all()
    spent = {c: 0 for c in collections}
    spent.update({c: int(n) for c, n in rows})
    for collection, cost in _spent_without_items(session, start, end, collections):
        spent[collection] += cost
    return spent


def _spent_without_items(
    session: Session, start: dt.datetime, end: dt.datetime, collections: set[str]
) -> list[tuple[str, int]]:
    """Requests that served no document (search queries) count in full towards the collection
    their row names."""
    has_items = sa.exists().where(RequestItem.request_id == ProviderRequest.id)
    rows = session.execute(
        sa.select(ProviderRequest.collection, sa.func.coalesce(sa.func.sum(request_cost_nano()), 0))
        .where(in_window(start, end), ~has_items, ProviderRequest.collection.in_(sorted(collections)))
        .group_by(ProviderRequest.collection)
    ).all()
    return [(str(c), int(n)) for c, n in rows]
