"""Success bodies of both APIs for a valid `EmbedCall`.

Native: `{"output": {"embeddings": [{"text_index", "embedding", "sparse_embedding"}]}, "usage":
{"total_tokens"}, "request_id"}`. Compatible: `{"object": "list", "model", "data": [{"object":
"embedding", "index", "embedding"}], "usage": {"prompt_tokens", "total_tokens"}, "id"}`.
"""

from __future__ import annotations

from typing import Any

from api.emulator.parsing import EmbedCall
from api.emulator.vectors import dense_vector, sparse_vector


def answer_body(api: str, call: EmbedCall, request_id: str) -> dict[str, Any]:
    """The 200 body `api` returns for `call`."""
    rows = _rows(call)
    if api == "native":
        usage = {"total_tokens": call.tokens}
        return {"output": {"embeddings": rows}, "usage": usage, "request_id": request_id}
    data = [
        {"object": "embedding", "index": row["text_index"], "embedding": row["embedding"]} for row in rows
    ]
    usage = {"prompt_tokens": call.tokens, "total_tokens": call.tokens}
    return {"object": "list", "model": call.spec.name, "data": data, "usage": usage, "id": request_id}


def _rows(call: EmbedCall) -> list[dict[str, Any]]:
    model, rows = call.spec.name, []
    for i, (text, ids) in enumerate(zip(call.texts, call.ids, strict=True)):
        row: dict[str, Any] = {"text_index": i}
        if call.dense:
            vector = dense_vector(model, call.dimensions, text, ids, call.text_type, call.instruct)
            row["embedding"] = vector.tolist()
        if call.sparse:
            row["sparse_embedding"] = sparse_vector(model, ids)
        rows.append(row)
    return rows
