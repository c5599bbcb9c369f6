"""Tables of change capture (worker/capture/): per-source state."""

from __future__ import annotations
