"""Tables of aliases and re-embedding: collection migrations."""

from __future__ import annotations
