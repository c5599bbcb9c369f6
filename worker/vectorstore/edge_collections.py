"""Qdrant Edge collections (one shard each): creating, checking, aliasing, dropping and
optimising them; the writes are worker/vectorstore/edge.py's, the reads edge_reads.py's.

`optimize()` merges segments and builds the HNSW index. Edge holds the GIL while it optimises
(measured: no other thread runs), so it runs in a child process on the closed shard (killed after
OPTIMIZE_TIMEOUT_S); meanwhile every write of this store waits (it holds the store's lock), and a
read already running on that shard fails as StoreUnavailable.
`optimize_if_due` does it once `optimize_after_points` points were written since, and the
embedding service calls it only when idle (worker/service.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import qdrant_edge as qe

from worker.errors import ConfigError, StoreUnavailable
from worker.vectorstore.base import DENSE, SPARSE
from worker.vectorstore.edge_reads import EdgeReads, translated

RETIRE_S = 5.0  # a replaced plain shard is closed this long after its alias took its name
OPTIMIZE_TIMEOUT_S = 3600.0  # an optimisation that takes longer is killed; the shard reopens as it was
_INDEXES: dict[str, qe.PayloadSchemaType] = {
    "tenant": qe.PayloadSchemaType.Keyword,
    "doc_id": qe.PayloadSchemaType.Keyword,
    "version": qe.PayloadSchemaType.Integer,
}
_OPTIMIZE = (
    "import sys, qdrant_edge as qe\n"
    "s = qe.EdgeShard.load(sys.argv[1])\n"
    "done = s.optimize()\n"
    "s.close()\n"
    "print(int(done))\n"
)


class EdgeCollections(EdgeReads):
    """The collections part of EdgeStore (worker/vectorstore/edge.py)."""

    def __init__(self, root: Path, *, prefix: str = "", optimize_after_points: int = 10_000) -> None:
        super().__init__(root, prefix=prefix)
        self.optimize_after_points = optimize_after_points
        self._written: dict[str, int] = {}  # shard name -> points written since its optimisation

    # --- collections ----------------------------------------------------------------------

    def ensure_collection(
        self, collection: str, dimensions: int, *, sparse: bool = False, alias: str | None = None
    ) -> None:
        name = self._name(collection)
        with self._lock, translated("ensure_collection"):
            if name not in self._ready:
                shard = self._shard(name) or self._create(name, dimensions, sparse)
                if alias is not None and not self.exists(alias):
                    self.set_alias(alias, collection)
                self._ready[name] = self._check(name, shard)
            stored, has_sparse = self._ready[name]
            if stored != dimensions:
                raise ConfigError(
                    f"edge collection {name!r} holds {stored}-dimension vectors, not {dimensions}: "
                    "a changed dimension is a new vector space, so use a new collection"
                )
            if sparse and not has_sparse:  # Edge adds a named vector to a live shard
                self._shards[name].update(qe.UpdateOperation.create_sparse_vector(SPARSE))
                self._ready[name] = (stored, True)

    def _create(self, name: str, dimensions: int, sparse: bool) -> qe.EdgeShard:
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dimensions, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams()} if sparse else None,
        )
        shard = self._shards[name] = qe.EdgeShard.create(str(self._path(name)), config)
        return shard

    def _check(self, name: str, shard: qe.EdgeShard) -> tuple[int, bool]:
        """(dense size, has sparse), after adding missing payload indexes."""
        params = self._params(name)
        if params is None:
            raise ConfigError(f"edge collection {name!r} has no edge_config.json")
        schema = shard.info().payload_schema
        for key, kind in _INDEXES.items():
            if key not in schema:
                shard.update(qe.UpdateOperation.create_field_index(key, kind))
        return params[0], params[2]

    def drop_collection(self, collection: str) -> None:
        import shutil

        name = self._name(collection)
        with self._lock:
            if name in self._aliases.values():
                raise ConfigError(f"edge collection {name!r} still has aliases")
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            self._ready.pop(name, None)
            self._written.pop(name, None)
            shutil.rmtree(self._path(name), ignore_errors=True)

    def replace_with_alias(self, alias: str, collection: str) -> None:
        """The alias first, then the plain shard is dropped: a reader resolves the alias from
        the moment it is saved, so no reader of this store finds the name missing; the shard is
        closed RETIRE_S later, so a read that resolved the old name just before ends first."""
        name, target = self.prefix + alias, self._name(collection)
        with self._lock:
            if not self._exists(target):
                raise ConfigError(f"alias target {target!r} does not exist")
            self._save_aliases({**self._aliases, name: target})
            shard = self._shards.pop(name, None)
            self._ready.pop(name, None)
            self._written.pop(name, None)
            retired = self._path(name).rename(self.shards_dir / f".retired-{name}-{time.time_ns()}")
        timer = threading.Timer(RETIRE_S, self._retire, args=(shard, retired))
        timer.daemon = True
        timer.start()

    def _retire(self, shard: qe.EdgeShard | None, path: Path) -> None:
        import contextlib
        import shutil

        with self._lock:
            if shard is not None:
                with contextlib.suppress(Exception):  # closed with the store meanwhile
                    shard.close()
            shutil.rmtree(path, ignore_errors=True)

    # --- housekeeping -----------------------------------------------------------------------

    def optimize(self, collection: str) -> bool:
        """Merge segments and build the index in a child process; True if anything changed."""
        name = self._name(collection)
        with self._lock:
            if not self._exists(name):
                return False
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            self._written[name] = 0  # a failed run is not retried on every idle tick
            try:
                done = subprocess.run(
                    [sys.executable, "-c", _OPTIMIZE, str(self._path(name))],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=OPTIMIZE_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired as exc:
                raise StoreUnavailable(f"edge optimize {name!r}: over {OPTIMIZE_TIMEOUT_S:.0f} s") from exc
            finally:
                self._shard(name)
            if done.returncode != 0:
                raise StoreUnavailable(f"edge optimize {name!r}: {done.stderr.strip()[-300:]}")
            return done.stdout.strip().endswith("1")

    def optimize_if_due(self) -> bool:
        """Optimise each collection with `optimize_after_points` writes since its last one."""
        with self._lock:
            due = [n for n, count in self._written.items() if count >= self.optimize_after_points]
        for name in due:
            n = len(self.prefix)
            self.optimize(name[n:] if name.startswith(self.prefix) else name)
        return bool(due)

    def flush(self) -> None:
        with self._lock, translated("flush"):
            for shard in self._shards.values():
                shard.flush()
