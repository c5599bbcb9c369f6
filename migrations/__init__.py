"""Alembic revisions of the vector-sidecar schema (run with `sidecar migrate`)."""
