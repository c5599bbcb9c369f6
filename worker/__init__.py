"""vector-sidecar worker: events → SQL desired state → chunks → DashScope embeddings → Qdrant + ledger."""
