"""A migration's life, advanced one step at a time by whoever holds its lease: `sidecar reembed`
in the foreground, or the worker's embedding loop (one step per cycle, worker/pipeline.py).

    backfilling   the follower fills `to` (and, for a plain collection, a `from` copy) from SQL
    validating    caught up: `to` is read back and compared with SQL, every indexed document at
                  its latest version and no deleted one; a mismatch is followed again
    switched      the route moves to `to` in SQL; `reembed_settle_s` later (every process has
                  seen the new route by then) the alias follows; `from` is kept current for a
                  rollback, so a live change is written to both ("dual write")
    finalized     `--finalize`: `from` is dropped, settle time after the follower stopped
    rolled_back   `--rollback`: `from` caught up, the route and the alias move back; `to` is
                  dropped after the settle time (a read that resolved the alias before ends first)

Store steps wait for `requested` (`alias`, `cleanup`) to be done, so a kill between the SQL
step and the store step is finished by the next run. No step sleeps: a step that must wait
returns and is tried again.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import sqlalchemy as sa

from worker.batch.report import unavailable_reason
from worker.errors import ConfigError, SidecarError
from worker.reembed import batched, names, routes
from worker.reembed.follow import due_filter, follow, sides
from worker.runtime import Runtime
from worker.sql.engines import changed_rows
from worker.sql.models import Document, utcnow
from worker.sql.reembed_models import CollectionModel, Migration, MigrationMark

log = logging.getLogger(__name__)

LEASE_S = 20.0  # a runner killed mid-step holds the migration this long at most


def start(rt: Runtime, collection: str, model: str, dimensions: int, *, lane: str = "realtime") -> int:
    """A new migration of `collection` to `model` and `dimensions`, or the one under way to
    them (a re-run continues it); ConfigError when another one is under way."""
    # ConfigError naming what cannot work: the model, its sizes, the region, sparse vectors
    settings = rt.settings.model_copy(update={"embedding_model": model, "embedding_dimensions": dimensions})
    settings.model_spec()
    if lane == "batch" and (reason := unavailable_reason(settings)) is not None:
        raise ConfigError(f"--lane batch is not available: {reason}")
    with rt.sessions.begin() as session:
        if not session.execute(sa.select(Document.id).filter_by(collection=collection).limit(1)).first():
            raise ConfigError(f"collection {collection!r} has no documents")
    route = routes.resolve(rt, [collection])[collection]
    with rt.sessions.begin() as session:
        running = session.execute(
            sa.select(Migration).where(
                Migration.collection == collection,
                sa.or_(Migration.state.in_(routes.ACTIVE), Migration.requested.is_not(None)),
            )
        ).scalar_one_or_none()
        if running is not None:
            if (running.to_model, running.to_dimensions) == (
                model,
                dimensions,
            ) and running.state != "switched":
                return running.id
            raise ConfigError(
                f"collection {collection!r} has a migration to {running.to_physical!r} ({running.state}); "
                "finish it first with --finalize or --rollback"
            )
        if (route.model, route.dimensions) == (model, dimensions):
            raise ConfigError(f"collection {collection!r} is already embedded with {model} at {dimensions}")
        row = session.get(CollectionModel, collection, with_for_update=True)
        assert row is not None  # resolve registered it
        n = row.counter + 1
        legacy = route.physical == collection  # a plain collection: copied first, replaced at the switch
        from_physical = (
            names.physical_name(collection, route.model, route.dimensions, n) if legacy else route.physical
        )
        n += legacy
        mig = Migration(
            collection=collection,
            state="backfilling",
            lane=lane,
            from_physical=from_physical,
            from_model=route.model,
            from_dimensions=route.dimensions,
            legacy=collection if legacy else None,
            to_physical=names.physical_name(collection, model, dimensions, n),
            to_model=model,
            to_dimensions=dimensions,
        )
        row.counter = n
        session.add(mig)
        session.flush()
        log.info("reembed.started migration=%d collection=%s to=%s", mig.id, collection, mig.to_physical)
        return mig.id


def request(rt: Runtime, collection: str, what: str) -> int:
    """Ask for `rollback` or `finalize` of the collection's migration; its id."""
    with rt.sessions.begin() as session:
        mig = session.execute(
            sa.select(Migration)
            .where(Migration.collection == collection, Migration.state.in_(routes.ACTIVE))
            .with_for_update()
        ).scalar_one_or_none()
        if mig is None:
            raise ConfigError(f"collection {collection!r} has no migration under way")
        if what == "finalize" and mig.state != "switched":
            raise ConfigError(
                f"the migration of {collection!r} is {mig.state}: only a switched one can be finalized"
            )
        if mig.requested not in (None, what):
            raise ConfigError(
                f"the migration of {collection!r} is busy ({mig.requested}); try again in a moment"
            )
        mig.requested = what
        return mig.id


def step(rt: Runtime) -> None:
    """The embedding loop's hook: one step of each migration with work to do, if its lease is
    free; one found caught up (or busy elsewhere) is looked at again `reembed_follow_interval_s`
    later, so that a long rollback window costs a query every few seconds, not every cycle."""
    found = routes.cache(rt).fresh(rt)
    for mig_id in found.migrations:
        if found.idle_until.get(mig_id, 0.0) > time.monotonic():
            continue
        try:
            more = advance(rt, mig_id)
        except Exception as exc:  # the pipeline's cycle goes on; the error is on the migration's row
            log.warning("reembed.step_failed migration=%d error=%s", mig_id, type(exc).__name__)
            more = False
        if not more:
            found.idle_until[mig_id] = time.monotonic() + rt.settings.reembed_follow_interval_s


def advance(rt: Runtime, mig_id: int) -> bool:
    """One step under the migration's lease; True if there is more to do now."""
    mig = _lease(rt, mig_id)
    if mig is None:
        return False
    error = None
    try:
        return _advance(rt, mig)
    except SidecarError as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        _update(rt, mig.id, lease_owner=None, lease_until=None, last_error=error)


def _advance(rt: Runtime, mig: Migration) -> bool:
    if mig.requested in ("alias", "cleanup"):
        return _store_step(rt, mig)
    if mig.requested == "rollback":
        return _rollback(rt, mig)
    if mig.requested == "finalize":
        _update(rt, mig.id, state="finalized", requested="cleanup", finished_at=utcnow())
        return True
    waiting = batched.backfill(rt, mig)  # --lane batch: the backfill's batch jobs first
    if waiting is not None:
        return waiting
    side = sides(mig)
    if mig.state == "switched":
        return bool(follow(rt, mig, side["to"]) + follow(rt, mig, side["from"]))
    if mig.state not in ("backfilling", "validating"):
        return False
    if follow(rt, mig, side["to"]) + (follow(rt, mig, side["from"]) if mig.legacy else 0):
        _update(rt, mig.id, state="backfilling")
        return True
    _update(rt, mig.id, state="validating")
    bad = validate(rt, mig, "to") + (validate(rt, mig, "from") if mig.legacy else [])
    if bad:
        log.warning("reembed.validate migration=%d mismatched=%d", mig.id, len(bad))
        _update(rt, mig.id, state="backfilling")
        return True
    _switch(rt, mig)
    return True


def validate(rt: Runtime, mig: Migration, side: str) -> list[int]:
    """Read the side back: documents whose points are not SQL's latest settled version (their
    marks are dropped, so they are followed again)."""
    physical = sides(mig)[side].physical
    held = rt.store.doc_summaries(physical)
    with rt.sessions.begin() as session:
        rows = session.execute(
            sa.select(Document.id, Document.tenant, Document.doc_id, Document.version, Document.status).where(
                Document.collection == mig.collection,
                Document.status.in_(("indexed", "deleted")),
                sa.or_(Document.status == "deleted", Document.chunk_count != 0),  # no text: no points
            )
        ).all()
        bad = [
            r.id
            for r in rows
            if (
                r.status == "indexed"
                and (s := held.get((r.tenant, r.doc_id))) is not None
                and s.versions != {r.version}
            )
            or (r.status == "indexed" and (r.tenant, r.doc_id) not in held)
            or (r.status == "deleted" and (r.tenant, r.doc_id) in held)
        ]
        for start in range(0, len(bad), 500):
            session.execute(
                sa.delete(MigrationMark).where(
                    MigrationMark.migration_id == mig.id,
                    MigrationMark.side == side,
                    MigrationMark.document_id.in_(bad[start : start + 500]),
                )
            )
    return bad


def _switch(rt: Runtime, mig: Migration) -> None:
    """The route moves to `to` in SQL; the alias follows after the settle time (`_store_step`).
    `from` was the route until now, so it holds what SQL settled: that is its mark."""
    with rt.sessions.begin() as session:
        _route(session, mig.collection, mig.to_model, mig.to_dimensions, mig.to_physical)
        if not mig.legacy:
            marked = sa.select(MigrationMark.document_id).where(
                MigrationMark.migration_id == mig.id, MigrationMark.side == "from"
            )
            settled = sa.select(sa.literal(mig.id), sa.literal("from"), Document.id, Document.version).where(
                Document.collection == mig.collection,
                Document.status.in_(("indexed", "deleted")),
                Document.id.not_in(marked),
            )
            session.execute(
                sa.insert(MigrationMark).from_select(
                    ["migration_id", "side", "document_id", "version"], settled
                )
            )
        session.execute(
            sa.update(Migration)
            .where(Migration.id == mig.id)
            .values(state="switched", requested="alias", switched_at=utcnow())
        )
    log.info("reembed.switched migration=%d collection=%s to=%s", mig.id, mig.collection, mig.to_physical)


def _rollback(rt: Runtime, mig: Migration) -> bool:
    """Back to `from`: once it is caught up, the route moves back; the store follows later."""
    if mig.state == "switched":
        if follow(rt, mig, sides(mig)["from"]):
            return True
        with rt.sessions.begin() as session:
            _route(session, mig.collection, mig.from_model, mig.from_dimensions, mig.from_physical)
        rt.store.set_alias(mig.collection, mig.from_physical)  # `to` is dropped after the settle time
    _update(rt, mig.id, state="rolled_back", requested="cleanup", finished_at=utcnow())
    log.info("reembed.rolled_back migration=%d collection=%s", mig.id, mig.collection)
    return True


def _store_step(rt: Runtime, mig: Migration) -> bool:
    """The store follows a route change once every process has seen it (`reembed_settle_s`)."""
    since = mig.switched_at if mig.requested == "alias" else mig.finished_at
    settle_s = max(rt.settings.reembed_settle_s, 2 * rt.settings.reembed_route_refresh_s)
    if since is not None and utcnow() - since < dt.timedelta(seconds=settle_s):
        return True  # not yet
    if mig.state == "rolled_back" and mig.switched_at is not None and follow(rt, mig, sides(mig)["from"]):
        return True  # what processes wrote on the old route meanwhile
    store = rt.store
    if mig.requested == "alias":
        store.ensure_collection(mig.to_physical, mig.to_dimensions, sparse=rt.settings.sparse_vectors)
        if mig.legacy and mig.collection not in store.aliases():
            store.replace_with_alias(mig.collection, mig.to_physical)
        else:
            store.set_alias(mig.collection, mig.to_physical)
        _update(rt, mig.id, requested=None)
        return True
    if mig.state == "rolled_back":
        if mig.switched_at is not None:
            store.set_alias(mig.collection, mig.from_physical)  # done already, unless killed before
        elif mig.legacy:
            store.drop_collection(mig.from_physical)
        store.drop_collection(mig.to_physical)
    else:
        store.drop_collection(mig.from_physical)
    with rt.sessions.begin() as session:
        session.execute(sa.delete(MigrationMark).where(MigrationMark.migration_id == mig.id))
        session.execute(sa.update(Migration).where(Migration.id == mig.id).values(requested=None))
    log.info("reembed.done migration=%d state=%s", mig.id, mig.state)
    return False


def _route(session: Any, collection: str, model: str, dimensions: int, physical: str) -> None:
    session.execute(
        sa.update(CollectionModel)
        .where(CollectionModel.collection == collection)
        .values(model=model, dimensions=dimensions, physical=physical, updated_at=utcnow())
    )


def _lease(rt: Runtime, mig_id: int) -> Migration | None:
    now = utcnow()
    with rt.sessions.begin() as session:
        took = changed_rows(
            session,
            sa.update(Migration)
            .where(
                Migration.id == mig_id,
                sa.or_(
                    Migration.lease_owner.is_(None),
                    Migration.lease_until < now,
                    Migration.lease_owner == rt.owner,
                ),
            )
            .values(lease_owner=rt.owner, lease_until=now + dt.timedelta(seconds=LEASE_S))
            .execution_options(synchronize_session=False),
        )
        return session.get(Migration, mig_id) if took else None


def _update(rt: Runtime, mig_id: int, **values: Any) -> None:
    with rt.sessions.begin() as session:
        session.execute(sa.update(Migration).where(Migration.id == mig_id).values(**values))


def status(session: Any) -> list[dict[str, Any]]:
    """`sidecar status --json` "migrations": each migration, newest first, with its progress:
    documents of the collection settled in `to` at their latest version (`done`) of all settled."""
    rows = session.execute(sa.select(Migration).order_by(Migration.id.desc()).limit(50)).scalars().all()
    found = []
    for mig in rows:
        total = session.execute(
            sa.select(sa.func.count())
            .select_from(Document)
            .where(Document.collection == mig.collection, Document.status.in_(("indexed", "deleted")))
        ).scalar_one()
        if mig.state in ("backfilling", "validating", "switched"):
            joined, where = due_filter(mig.id, "to", mig.collection)
            waiting = session.execute(
                sa.select(sa.func.count()).select_from(joined).where(where)
            ).scalar_one()
        else:
            waiting = 0
        found.append(
            {
                "id": mig.id,
                "collection": mig.collection,
                "from": mig.from_physical,
                "to": mig.to_physical,
                "from_model": f"{mig.from_model}/{mig.from_dimensions}",
                "to_model": f"{mig.to_model}/{mig.to_dimensions}",
                "state": mig.state,
                "pending_step": mig.requested,
                "done": int(total) - int(waiting),
                "total": int(total),
                "lane": mig.lane,
                "batch_jobs_running": sum(
                    state in batched.RUNNING for state in batched.jobs_in(session, mig.to_physical).values()
                )
                if mig.lane == "batch"
                else 0,
                "last_error": mig.last_error,
            }
        )
    return found
