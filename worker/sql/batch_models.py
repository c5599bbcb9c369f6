"""Tables of the batch lane: batch jobs and their lines."""

from __future__ import annotations
