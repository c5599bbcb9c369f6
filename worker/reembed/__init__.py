"""Aliases and model changes without downtime (README "Model changes"): each collection is an alias over a
physical collection named after its model; `sidecar reembed` moves a collection to another model.

    names.py      physical collection names, and the logical name point ids are computed from
    parts.py      the runtime of another model (embedder, limiter, spec), built once per process
    routes.py     collection → (model, dimensions, physical collection), from SQL, cached;
                  the pipeline's and the searcher's view of it (RoutedStore)
    follow.py     the follower: brings a physical collection up to the text kept in SQL
    control.py    a migration's life: start, backfill, validate, switch, rollback, finalize
    batched.py    `--lane batch`: the backfill's text paid for by batch jobs (worker/batch/)
"""
