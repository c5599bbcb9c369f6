"""Physical collection names: `{collection}__{model}__{dimensions}__{n}` (a contract), e.g.
`articles__text_embedding_v4__1024__1`, with the model's `-` and `.` replaced by `_`.

Point ids are computed from the logical collection name (worker/vectorstore/base.py `point_id`
calls `logical_name`), so a document's points have the same ids in every physical collection of
its collection. A name is read as physical only when its model part is a model of the catalog,
so a plain collection keeps its own name as its id space.
"""

from __future__ import annotations

import re

from worker.catalog import MODELS


def model_part(model: str) -> str:
    return model.replace("-", "_").replace(".", "_")


_PHYSICAL = re.compile(
    r"^(?P<collection>.+?)__(?P<model>"
    + "|".join(re.escape(model_part(m)) for m in sorted(MODELS, key=len, reverse=True))
    + r")__(?P<dimensions>[0-9]+)__(?P<n>[0-9]+)$"
)


def physical_name(collection: str, model: str, dimensions: int, n: int) -> str:
    return f"{collection}__{model_part(model)}__{dimensions}__{n}"


def parse(name: str) -> tuple[str, str, int, int] | None:
    """(collection, model part, dimensions, n) of a physical name; None for any other name."""
    found = _PHYSICAL.match(name)
    if found is None:
        return None
    return found["collection"], found["model"], int(found["dimensions"]), int(found["n"])


def logical_name(name: str) -> str:
    """The collection a physical name belongs to; any other name is its own."""
    parsed = parse(name)
    return parsed[0] if parsed else name
