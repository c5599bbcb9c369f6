"""The embedding cache: vectors already paid for, keyed by what determines them.

Key = sha256 of model, dimensions, text type, instruct and the chunk's content hash (NFC
text), so unchanged text and redelivered work cost no tokens. An entry's `last_used_at` moves
forward (at most daily) when it is read, so retention removes only vectors nobody reuses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.sql.engines import insert_ignore_all
from worker.sql.models import CachedEmbedding, utcnow


@dataclass(frozen=True)
class Embedded:
    """What one paid row gave: the dense vector, and the sparse one when it was asked for."""

    vector: list[float]
    sparse: dict[int, float] | None = None


def cache_key(
    model: str,
    dimensions: int,
    content_hash: str,
    *,
    text_type: str = "document",
    instruct: str | None = None,
    sparse: bool = False,
) -> str:
    material = "\x1f".join(
        (
            model,
            str(dimensions),
            text_type,
            instruct or "",
            "dense&sparse" if sparse else "dense",
            content_hash,
        )
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


TOUCH_EVERY = dt.timedelta(days=1)


def get_many(session: Session, keys: Iterable[str]) -> dict[str, Embedded]:
    """The cached vectors of `keys` (those there are); each one found counts as used now."""
    wanted = list(set(keys))
    found: dict[str, Embedded] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            sa.select(CachedEmbedding.key, CachedEmbedding.vector, CachedEmbedding.sparse).where(
                CachedEmbedding.key.in_(wanted[start : start + 500])
            )
        )
        for key, blob, sparse in rows:
            found[key] = Embedded(
                np.frombuffer(blob, dtype="<f4").astype(float).tolist(),
                {int(i): v for i, v in sparse.items()} if sparse else None,
            )
    _touch(session, list(found))
    return found


def _touch(session: Session, keys: list[str]) -> None:
    now = utcnow()
    for start in range(0, len(keys), 500):
        session.execute(
            sa.update(CachedEmbedding)
            .where(
                CachedEmbedding.key.in_(keys[start : start + 500]),
                CachedEmbedding.last_used_at < now - TOUCH_EVERY,
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )


def put_many(
    session: Session, embedded: dict[str, Embedded], *, model: str, dimensions: int, request_id: str
) -> None:
    if not embedded:
        return
    now = utcnow()
    rows = [
        {
            "key": key,
            "model": model,
            "dimensions": dimensions,
            "request_id": request_id,
            "vector": np.asarray(e.vector, dtype="<f4").tobytes(),
            "sparse": {str(i): v for i, v in e.sparse.items()} if e.sparse is not None else None,
            "created_at": now,
            "last_used_at": now,
        }
        for key, e in embedded.items()
    ]
    for start in range(0, len(rows), 200):
        insert_ignore_all(session, CachedEmbedding, rows[start : start + 200])
