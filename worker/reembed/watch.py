"""A stand-in store for a process that only watches a migration (`sidecar reembed` while a
worker holds the embedded store): every call says so, and nothing is touched."""

from __future__ import annotations

from typing import Any, NoReturn

from worker.errors import ConfigError


class WatchOnlyStore:
    """Satisfies `VectorStore`; every method raises ConfigError except `close`."""

    def _held(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ConfigError(
            "the store is held by a running worker; for a collection it has not written yet, "
            "stop it or let it index one event first"
        )

    ensure_collection = write_document = delete_document = doc_summaries = count = search = _held
    set_alias = delete_alias = aliases = exists = replace_with_alias = drop_collection = _held

    def optimize_if_due(self) -> bool:
        return False

    def close(self) -> None:
        pass
