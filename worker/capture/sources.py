"""The sources file (README, change capture) and turning one changed row into an event.

`load_sources` reads the TOML file and refuses it whole, naming the source and the key, when any
entry is wrong: a capture process that started on half its sources would look healthy. Templates
(`doc_id`, `text`, `tenant`) are Python format strings over the row's columns (`"{title}\\n\\n{body}"`),
checked when the file is read; `render` fills them for one row, or raises RowRejected naming the
rule (a column the template needs is missing, the text is empty) so that the stream goes on.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.errors import ConfigError
from worker.events import NAME_PATTERN

SOURCE_NAME = re.compile(r"^[a-z0-9_]{1,48}$")
TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$")
KINDS = ("postgres", "debezium")
COMMON_KEYS = {"name", "kind", "collection", "doc_id", "text", "metadata", "tenant"}
KEYS = {
    "postgres": COMMON_KEYS | {"dsn", "dsn_env", "table", "where"},
    "debezium": COMMON_KEYS | {"stream", "redis_url"},
}
# Debezium marks a TOASTed column it could not read with this value (unavailable.value.placeholder).
UNAVAILABLE = "__debezium_unavailable_value"


class RowRejected(Exception):
    """One change that cannot become an event: `field` and `rule` say why (the stream goes on)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True)
class Source:
    name: str
    kind: Literal["postgres", "debezium"]
    collection: str
    doc_id: str
    text: str
    metadata: tuple[str, ...] = ()
    tenant: str | None = None
    dsn: str | None = None
    table: str | None = None
    where: str | None = None
    stream: str | None = None
    redis_url: str | None = None

    @property
    def text_columns(self) -> frozenset[str]:
        """The columns whose value makes the text (an update touching none of them costs no tokens)."""
        return frozenset(template_fields(self.text))

    @property
    def columns(self) -> frozenset[str]:
        """Every column the event is made from."""
        used = template_fields(self.doc_id) | template_fields(self.text) | set(self.metadata)
        return frozenset(used | (template_fields(self.tenant) if self.tenant else set()))

    @property
    def slot(self) -> str:
        return self.name

    @property
    def publication(self) -> str:
        return f"sidecar_{self.name}"

    def schema_table(self) -> tuple[str, str]:
        schema, _, table = (self.table or "").partition(".")
        return schema, table


def template_fields(template: str) -> set[str]:
    """The column names a template uses; ValueError for a malformed one."""
    names = set()
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field) or spec or conversion:
            raise ValueError(f"{{{field}}} must name one column, with no format spec or conversion")
        names.add(field)
    return names


def load_sources(path: Path, *, default_redis_url: str | None = None) -> list[Source]:
    """Every source of the file, or ConfigError naming the source and the key."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"sources file {path}: {exc.strerror or type(exc).__name__}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sources file {path}: not TOML ({exc})") from exc
    entries = data.get("sources")
    if not isinstance(entries, list) or not entries or set(data) - {"sources"}:
        raise ConfigError(f"sources file {path}: needs one or more [[sources]] tables and nothing else")
    sources = [_source(entry, index, default_redis_url) for index, entry in enumerate(entries)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"sources file {path}: source names must be unique")
    return sources


def _source(entry: Any, index: int, default_redis_url: str | None) -> Source:
    where = f"sources[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not SOURCE_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: required, must match {SOURCE_NAME.pattern}")
    where = f"source {name!r}"
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(KINDS)}")
    unknown = sorted(set(entry) - KEYS[kind])
    if unknown:
        allowed = ", ".join(sorted(KEYS[kind]))
        raise ConfigError(f"{where}.{unknown[0]}: unknown key for kind {kind}; allowed: {allowed}")
    collection = _string(entry, "collection", where)
    if not re.fullmatch(NAME_PATTERN, collection):
        raise ConfigError(f"{where}.collection: must match {NAME_PATTERN}")
    values = {key: _template(entry, key, where) for key in ("doc_id", "text")}
    tenant = _template(entry, "tenant", where) if "tenant" in entry else None
    metadata = entry.get("metadata", [])
    if not isinstance(metadata, list) or not all(isinstance(c, str) and c for c in metadata):
        raise ConfigError(f"{where}.metadata: must be a list of column names")
    common: dict[str, Any] = dict(
        name=name, kind=kind, collection=collection, metadata=tuple(metadata), tenant=tenant, **values
    )
    if kind == "postgres":
        return Source(**common, **_postgres_keys(entry, where))
    stream = _string(entry, "stream", where)
    redis_url = entry.get("redis_url", default_redis_url)
    if not isinstance(redis_url, str) or not redis_url:
        raise ConfigError(f"{where}.redis_url: required (or set SIDECAR_REDIS_URL)")
    return Source(**common, stream=stream, redis_url=redis_url)


def _postgres_keys(entry: dict[str, Any], where: str) -> dict[str, Any]:
    if ("dsn" in entry) == ("dsn_env" in entry):
        raise ConfigError(f"{where}.dsn: give exactly one of dsn and dsn_env")
    if "dsn_env" in entry:
        variable = _string(entry, "dsn_env", where)
        dsn = os.environ.get(variable)
        if not dsn:
            raise ConfigError(f"{where}.dsn_env: environment variable {variable} is not set")
    else:
        dsn = _string(entry, "dsn", where)
    table = _string(entry, "table", where)
    if not TABLE_NAME.fullmatch(table):
        raise ConfigError(f"{where}.table: must be schema.table (plain identifiers)")
    filter_ = entry.get("where")
    if filter_ is not None and (not isinstance(filter_, str) or not filter_.strip()):
        raise ConfigError(f"{where}.where: must be a non-empty SQL condition")
    return {"dsn": dsn, "table": table, "where": filter_}


def _string(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: required, a non-empty string")
    return value


def _template(entry: dict[str, Any], key: str, where: str) -> str:
    value = _string(entry, key, where)
    try:
        if not template_fields(value) and key != "text":
            raise ValueError("must use at least one column, e.g. {id}")
    except ValueError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from exc
    return value


# --- one row → one event ---------------------------------------------------------------------


def render(
    source: Source, row: dict[str, Any], *, version: int, lane: str | None = None, text: str | None = None
) -> dict[str, Any]:
    """The upsert event of §2 for `row` (column → value), or RowRejected; `text` given: kept as is."""
    event: dict[str, Any] = {
        "op": "upsert",
        "collection": source.collection,
        "doc_id": fill(source.doc_id, row, "doc_id"),
        "version": version,
        "text": fill(source.text, row, "text") if text is None else text,
    }
    if not event["text"].strip():
        raise RowRejected("text", "empty after filling the text template")
    if source.tenant:
        event["tenant"] = fill(source.tenant, row, "tenant")
    if source.metadata:
        missing = [c for c in source.metadata if c not in row]
        if missing:
            raise RowRejected("metadata", f"column {missing[0]!r} of the metadata list is not in the row")
        event["metadata"] = {c: row[c] for c in source.metadata}
    if lane is not None:
        event["lane"] = lane
    return event


def render_delete(source: Source, row: dict[str, Any], *, version: int) -> dict[str, Any]:
    """The delete event for a row (its key columns suffice when the templates use only them)."""
    event: dict[str, Any] = {
        "op": "delete",
        "collection": source.collection,
        "doc_id": fill(source.doc_id, row, "doc_id"),
        "version": version,
    }
    if source.tenant:
        event["tenant"] = fill(source.tenant, row, "tenant")
    return event


def fill(template: str, row: dict[str, Any], field: str) -> str:
    """`template` over `row`; a column missing (or never read) is RowRejected naming it."""
    values = {}
    for name in template_fields(template):
        if name not in row:
            raise RowRejected(field, f"template column {name!r} is not in the row")
        value = row[name]
        if value == UNAVAILABLE:
            raise RowRejected(field, f"template column {name!r} is unavailable (unchanged TOAST value)")
        values[name] = "" if value is None else value
    return template.format_map(values)


def row_key(source: Source, row: dict[str, Any]) -> str:
    """How a rejection names the row: its doc_id when it renders, else the columns it has."""
    try:
        return fill(source.doc_id, row, "doc_id")[:200]
    except RowRejected:
        return ",".join(f"{k}={row[k]!r}" for k in sorted(row)[:4])[:200]
