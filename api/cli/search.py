"""`sidecar search TEXT`: the nearest chunks, searched in this process (worker/search.py), or
through a running API (`--api URL`) when the embedded store is held by a worker."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.errors import ConfigError, InvalidQuery, SidecarError
from worker.settings import Settings

EXCERPT_CHARS = 60
DESCRIPTION = """\
Embed TEXT as a search query (through the rate limiter, the budget caps and the ledger, lane
"query"; a repeated query in one process costs nothing) and print the nearest chunks: rank, score,
doc_id, chunk, version and an excerpt, or JSON. The store is opened in this process; the embedded
store can be open in one process only, so while `sidecar serve` holds it, pass --api URL to ask
that process instead (token: --token, else the first of SIDECAR_API_READ_TOKENS, SIDECAR_API_TOKENS).
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("search", help="the chunks nearest to a text", description=DESCRIPTION)
    p.add_argument("text", help="what to look for")
    p.add_argument("--collection", help="default: SIDECAR_DEFAULT_COLLECTION")
    p.add_argument("--limit", type=int, default=10, help="at most this many hits (1-100, default 10)")
    p.add_argument("--tenant", help="only this tenant's documents")
    p.add_argument(
        "--filter", dest="meta_filter", help='meta key → value as a JSON object, e.g. {"lang":"en"}'
    )
    p.add_argument("--api", help="the API of a running `sidecar serve` to ask when the store is held")
    p.add_argument("--token", help="bearer token for --api")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    settings = Settings()
    params: dict[str, Any] = {
        "collection": args.collection or settings.default_collection,
        "q": args.text,
        "limit": args.limit,
    }
    if args.tenant:
        params["tenant"] = args.tenant
    meta = None
    if args.meta_filter:
        try:
            meta = json.loads(args.meta_filter)
        except ValueError:
            print("sidecar search: --filter must be a JSON object", file=sys.stderr)
            return 2
        params["filter"] = args.meta_filter
    answer: dict[str, Any] | None
    try:
        answer = search_here(settings, params, meta)
    except ConfigError as exc:  # the embedded store is held by another process, most often
        if not args.api:
            print(
                f"sidecar search: {exc}\nthe store cannot be opened here; ask the process that holds it: "
                "sidecar search TEXT --api http://HOST:PORT (the API of `sidecar serve`)",
                file=sys.stderr,
            )
            return 2
        answer = search_over_http(settings, args.api, args.token, params)
    except SidecarError as exc:
        print(f"sidecar search: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidQuery) else 1
    if answer is None:
        return 1
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else render_hits(answer))
    return 0


def search_here(settings: Settings, params: dict[str, Any], meta: dict[str, Any] | None) -> dict[str, Any]:
    from worker.runtime import build_runtime  # imported here: the store client is slow to import
    from worker.search import Searcher
    from worker.sql import schema

    rt = build_runtime(settings)
    try:
        schema.check_schema(rt.engine)
        result = Searcher(rt).search(
            params["collection"], params["q"], limit=params["limit"], tenant=params.get("tenant"), meta=meta
        )
    finally:
        rt.close()
    return result.as_json()


def search_over_http(
    settings: Settings, url: str, token: str | None, params: dict[str, Any]
) -> dict[str, Any] | None:
    """The API's answer, or None after printing why it refused."""
    import httpx

    secrets = [*settings.api_read_tokens, *settings.api_tokens]
    token = token or (secrets[0].get_secret_value() if secrets else None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(
            f"{url.rstrip('/')}/v1/search", params=params, headers=headers, timeout=settings.request_timeout_s
        )
    except httpx.HTTPError as exc:
        print(f"sidecar search: {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        print(f"sidecar search: HTTP {response.status_code}: {detail}", file=sys.stderr)
        return None
    found: dict[str, Any] = response.json()
    return found


def render_hits(answer: dict[str, Any]) -> str:
    """An aligned table: rank, score, doc_id, chunk, version, excerpt."""
    heads = ("rank", "score", "doc_id", "chunk", "version", "text")
    rows = [
        (
            str(i),
            f"{h['score']:.4f}",
            h["doc_id"],
            str(h["chunk_index"]),
            str(h["version"]),
            excerpt(h.get("text")),
        )
        for i, h in enumerate(answer["hits"], 1)
    ]
    widths = [max(len(r[c]) for r in [heads, *rows]) for c in range(len(heads) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)), r[-1]])
        for r in [heads, *rows]
    ]
    source = "cached query, no cost" if answer.get("cached") else f"ledger request {answer.get('request_id')}"
    lines.append(f"{len(rows)} hit(s); {source}")
    return "\n".join(lines)


def excerpt(text: str | None) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"
