"""The embedding cache: vectors already paid for, keyed by what determines them.

Key = sha256 of model, dimensions, text type, instruct and the chunk's content hash (NFC
text), so unchanged text and redelivered work cost no tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import CachedEmbedding, insert_ignore, utcnow


def cache_key(model: str, dimensions: int, content_hash: str, *, text_type: str = "document",
              instruct: str | None = None) -> str:
    material = "\x1f".join((model, str(dimensions), text_type, instruct or "", content_hash))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def get_many(session: Session, keys: Iterable[str]) -> dict[str, list[float]]:
    wanted = list(set(keys))
    found: dict[str, list[float]] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            sa.select(CachedEmbedding.key, CachedEmbedding.vector).where(
                CachedEmbedding.key.in_(wanted[start : start + 500])
            )
        )
        for key, blob in rows:
            found[key] = np.frombuffer(blob, dtype="<f4").astype(float).tolist()
    return found


def put_many(session: Session, vectors: dict[str, list[float]], *, model: str, dimensions: int,
             request_id: str) -> None:
    if not vectors:
        return
    now = utcnow()
    rows = [
        {
            "key": key, "model": model, "dimensions": dimensions, "request_id": request_id,
            "vector": np.asarray(vector, dtype="<f4").tobytes(), "created_at": now,
        }
        for key, vector in vectors.items()
    ]
    for start in range(0, len(rows), 200):
        insert_ignore(session, CachedEmbedding, rows[start : start + 200])
