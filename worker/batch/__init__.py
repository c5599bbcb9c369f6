"""The batch lane: documents sent with `"lane": "batch"` are embedded through the
provider's Batch API at half the price, within its completion window.

Modules: `client` (the Batch File API over HTTP), `packing` (documents → one job, recorded in SQL
before the upload; `enqueue` sends existing documents this way), `importing` (results → cache,
ledger, documents), `lane` (the loop that moves jobs along), `report` (availability and status).
Tables: worker/sql/batch_models.py. Nothing is imported here, so that `report` stays light.
"""
