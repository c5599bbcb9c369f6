"""Rate limiting in front of every provider call: `base` (the algorithm and the seam), `local`
(one process) and `redis` (every process sharing one Redis key)."""
