"""Deterministic vectors: what the emulator answers for a text is a pure function of the request.

A dense vector is a sum of hashed per-token directions (shared by query and document, so a query
ranks documents sharing its words higher) plus a per-text component seeded from sha256 of (model,
dimensions, text_type, instruct, NFC text), so query and document vectors differ. Tests and
benchmarks compute the same vectors with `expected_vector` and `expected_sparse`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.tokens import decode, encode, normalize

_SLOTS_PER_TOKEN = 8  # each distinct token adds +-w at 8 hashed positions
_TEXT_WEIGHT = 0.5  # share of the per-text random component against the token component

Floats = npt.NDArray[np.float64]
Words = npt.NDArray[np.uint64]


def _seed(*fields: object) -> bytes:
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).digest()


def _salt(*fields: object) -> np.uint64:
    return np.uint64(int.from_bytes(_seed(*fields)[:8], "little"))


def _mix(x: Words) -> Words:
    """splitmix64 finaliser over a uint64 array (array arithmetic wraps silently)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _token_counts(ids: list[int]) -> tuple[Words, Floats]:
    """Distinct token ids (sorted) and their sublinear weights 1 + ln(count)."""
    unique, counts = np.unique(np.asarray(ids, dtype=np.uint64), return_counts=True)
    return unique, 1.0 + np.log(counts)


def dense_vector(
    model: str, dims: int, text: str, ids: list[int], text_type: str, instruct: str | None
) -> Floats:
    """The unit vector of an already normalised `text` whose token ids are `ids`."""
    unique, weights = _token_counts(ids)
    slots = np.arange(_SLOTS_PER_TOKEN, dtype=np.uint64)
    hashed = _mix(unique[:, None] * np.uint64(_SLOTS_PER_TOKEN) + slots + _salt(model, dims))
    signs = np.where(hashed >> np.uint64(63), 1.0, -1.0) * weights[:, None]
    positions = (hashed % np.uint64(dims)).astype(np.intp).ravel()
    tokens: Floats = np.bincount(positions, signs.ravel(), dims).astype(np.float64, copy=False)
    seed = _seed(model, dims, text_type, instruct, text)
    own = np.random.default_rng(int.from_bytes(seed[:16], "little")).standard_normal(dims)
    vector = _TEXT_WEIGHT * own / float(np.linalg.norm(own))
    norm = float(np.linalg.norm(tokens))
    if norm > 0:
        vector += tokens / norm
    return np.round(vector / float(np.linalg.norm(vector)), 8)


def sparse_vector(model: str, ids: list[int]) -> list[dict[str, Any]]:
    """One entry per distinct token id (sorted by index): its weight and its text."""
    unique, weights = _token_counts(ids)
    hashed = _mix(unique + _salt(model, "sparse")) >> np.uint64(11)
    base = 0.05 + 0.95 * hashed.astype(np.float64) / 2.0**53
    values: list[float] = np.round(base * weights, 4).tolist()
    indexes: list[int] = unique.tolist()
    return [{"index": i, "value": v, "token": _token_text(i)} for i, v in zip(indexes, values, strict=True)]


@functools.lru_cache(maxsize=65536)
def _token_text(token_id: int) -> str:
    return decode([token_id])


def expected_vector(
    model: str, dimensions: int, text: str, text_type: str = "document", instruct: str | None = None
) -> list[float]:
    """The unit vector the emulator returns for `text`: a pure function of its arguments."""
    text = normalize(text)
    vector: list[float] = dense_vector(model, dimensions, text, encode(text), text_type, instruct).tolist()
    return vector


def expected_sparse(model: str, text: str) -> list[dict[str, Any]]:
    """The sparse embedding of `text`: one entry per distinct Qwen token id, sorted by index."""
    return sparse_vector(model, encode(normalize(text)))
