"""`sidecar store`: the embedded vector store. `import-local` moves a qdrant-client local-mode
store into Qdrant Edge (worker/vectorstore/edge.py); `optimize` builds Edge's indexes now.

Both open the stores directly, so stop the worker (and `sidecar serve`) first: an embedded store
serves one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError
from worker.settings import Settings

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from worker.vectorstore.edge import EdgeStore

PAGE = 256


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = sub.add_parser(
        "store",
        help="the embedded vector store: import a local-mode store, optimise",
        description="Work on the embedded Qdrant Edge store (SIDECAR_EDGE_PATH, default "
        "<SIDECAR_DATA_DIR>/edge). Stop the worker first: the store serves one process.",
    )
    commands = store.add_subparsers(title="commands", metavar="COMMAND")
    p = commands.add_parser(
        "import-local",
        help="move a qdrant-client local-mode store into Qdrant Edge",
        description="Copy every collection of a local-mode store (every point with its dense and "
        "sparse vectors and payload, tombstones included, and its aliases) into the Edge store, "
        "then check the counts. Refuses a target collection that already holds points, unless --force "
        "(which replaces it). The source is left as it was.",
    )
    p.add_argument("--from", dest="source", type=Path, help="local-mode path (default <data dir>/qdrant)")
    p.add_argument("--to", dest="target", type=Path, help="Edge path (default SIDECAR_EDGE_PATH)")
    p.add_argument("--force", action="store_true", help="replace target collections holding points")
    p.add_argument("--no-optimize", action="store_true", help="skip building the index afterwards")
    p.set_defaults(func=cmd_import_local)
    p = commands.add_parser(
        "optimize",
        help="merge segments and build the HNSW index of Edge collections now",
        description="What the worker does by itself when idle after bulk loads.",
    )
    p.add_argument("collections", nargs="*", help="collections (default: all)")
    p.set_defaults(func=cmd_optimize)


def cmd_import_local(args: argparse.Namespace) -> int:
    settings = Settings()
    source = args.source or settings.qdrant_path or settings.data_dir / "qdrant"
    target = args.target or settings.resolved_edge_path()
    counts = import_local(source, target, force=args.force, optimize=not args.no_optimize)
    for name, count in counts.items():
        print(f"{name}: {count} points")
    print(f"imported {len(counts)} collections, {sum(counts.values())} points into {target}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from worker.vectorstore.edge import EdgeStore

    settings = Settings()
    store = EdgeStore(settings.resolved_edge_path(), prefix=settings.collection_prefix)
    try:
        for name in args.collections or store.list_collections():
            changed = store.optimize(name)
            print(f"{name}: {'optimised' if changed else 'already optimal'}")
    finally:
        store.close()
    return 0


def import_local(source: Path, target: Path, *, force: bool = False, optimize: bool = True) -> dict[str, int]:
    """{collection: points copied} from the local-mode store at `source` into Edge at `target`."""
    from qdrant_client import QdrantClient

    from worker.vectorstore.edge import EdgeStore

    if not (source / "meta.json").exists():
        raise ConfigError(f"{source} holds no qdrant-client local-mode store (no meta.json)")
    try:
        client = QdrantClient(path=str(source))
    except RuntimeError as exc:  # locked by a running worker
        raise ConfigError(f"{source}: {exc}; stop the worker first") from exc
    try:
        names = sorted(c.name for c in client.get_collections().collections)
        edge = EdgeStore(target)
        try:
            _refuse_filled(edge, names, force)
            counts = {name: _copy_collection(client, edge, name) for name in names}
            for alias in client.get_aliases().aliases:
                edge.set_alias(alias.alias_name, alias.collection_name)
            if optimize:
                for name in names:
                    print(f"{name}: building the index…", file=sys.stderr, flush=True)
                    edge.optimize(name)
            return counts
        finally:
            edge.close()
    finally:
        client.close()


def _refuse_filled(edge: EdgeStore, names: list[str], force: bool) -> None:
    filled = [n for n in names if n in edge.list_collections() and edge.count_all(n) > 0]
    if filled and not force:
        raise ConfigError(
            f"the Edge store at {edge.root} already holds points in {', '.join(filled)}; "
            "pass --force to replace them"
        )
    for name in names:
        if name in edge.list_collections():
            for alias, collection in edge.aliases().items():
                if collection == name:
                    edge.delete_alias(alias)
            edge.drop_collection(name)


def _copy_collection(client: QdrantClient, edge: EdgeStore, name: str) -> int:
    import qdrant_edge as qe

    from worker.vectorstore.base import DENSE, SPARSE

    params = client.get_collection(name).config.params
    vectors = params.vectors if isinstance(params.vectors, dict) else {}
    if DENSE not in vectors:
        raise ConfigError(f"collection {name!r} has no named vector {DENSE!r}; it is not the sidecar's")
    edge.ensure_collection(name, vectors[DENSE].size, sparse=SPARSE in (params.sparse_vectors or {}))
    total = client.count(name, exact=True).count
    done, offset = 0, None
    while True:
        records, offset = client.scroll(name, limit=PAGE, offset=offset, with_payload=True, with_vectors=True)
        points = [qe.Point(r.id, _vectors(r.vector), r.payload or {}) for r in records]
        if points:
            edge.put_points(name, points)
        done += len(points)
        print(f"\r{name}: {done}/{total}", end="", file=sys.stderr, flush=True)
        if offset is None:
            break
    print(file=sys.stderr)
    stored = edge.count_all(name)
    if stored != total:
        raise ConfigError(f"collection {name!r}: copied {stored} points, the source holds {total}")
    return stored


def _vectors(vector: Any) -> dict[str, Any]:
    """Local mode's named vectors as Edge's: dense lists as they are, sparse as SparseVector."""
    import qdrant_edge as qe

    found: dict[str, Any] = {}
    for key, value in (vector or {}).items() if isinstance(vector, dict) else ():
        if hasattr(value, "indices"):
            found[key] = qe.SparseVector(list(value.indices), list(value.values))
        else:
            found[key] = [float(x) for x in value]
    return found
