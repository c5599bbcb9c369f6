"""The batch lane follows re-embed routes (worker/batch/, worker/reembed/): a collection moved to
another model gets batch jobs of that model written to its routed physical collection (the old
one kept current until --finalize), and `reembed --lane batch` backfills through batch jobs at
half price. Real SQL (SQLite and PostgreSQL), Qdrant (local mode), HTTP to the emulator."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from api.emulator import expected_vector
from tests.fixtures.runtime import make_settings
from tests.test_batch_lane import FAST, balanced
from tests.test_reembed import V3, V4, drain, ledger_equals_bill, run_until, text, upsert
from tests.test_reembed_cli import cli_env, sidecar
from worker.batch.lane import BatchLane
from worker.errors import ConfigError
from worker.reembed import batched, control
from worker.runtime import build_runtime
from worker.sql import schema
from worker.sql.batch_models import BatchJob
from worker.sql.models import Document, ProviderRequest
from worker.sql.reembed_models import Migration
from worker.tasks import ingest_events

OTHER_V4 = "other__text_embedding_v4__1024__1"


@pytest.fixture()
def lanes():
    made: list[BatchLane] = []

    def make(rt) -> BatchLane:
        made.append(BatchLane(rt))
        return made[-1]

    yield make
    for lane in made:
        lane.client.close()


def assert_holds_sql(rt, physical: str, collection: str = "documents") -> None:
    """The physical collection holds every indexed document of the collection at its version
    and no deleted one."""
    held = versions(rt, physical)
    with rt.sessions() as session:
        rows = session.execute(
            sa.select(Document.doc_id, Document.status, Document.version).where(
                Document.collection == collection
            )
        ).all()
    for doc_id, status, version in rows:
        if status == "indexed":
            assert held.get(doc_id) == {version}, (physical, doc_id, held.get(doc_id), version)
        elif status == "deleted":
            assert doc_id not in held, (physical, doc_id)


def batch_event(i: int, version: int, collection: str = "documents") -> dict:
    return {**upsert(i, version, rev=version), "collection": collection, "lane": "batch"}


def close_to(points, model: str, dimensions: int, content: str) -> bool:
    expected = expected_vector(model, dimensions, content)
    return (
        len(points) == 1 and max(abs(a - b) for a, b in zip(points[0].vector, expected, strict=True)) < 1e-6
    )


def versions(rt, physical: str) -> dict[str, set[int]]:
    return {doc_id: s.versions for (_t, doc_id), s in rt.store.doc_summaries(physical).items()}


def drive_until(lane: BatchLane, done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the batch lane did not finish in time"
        lane.tick()
        time.sleep(0.05)


def test_batch_lane_embeds_a_reembedded_collection_with_its_new_model(make_runtime, emulator, lanes):
    emulator.configure(batch_duration_s=0.2)
    rt = make_runtime(**FAST, reembed_settle_s=0.3, reembed_route_refresh_s=0.1)
    ingest_events(rt, [upsert(i, 1) for i in range(6)] + [{**upsert(0, 1), "collection": "other"}])
    drain(rt)
    mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
    run_until(rt, mig_id, "switched")  # routed to v3/512; v4/1024 kept current until --finalize

    ingest_events(rt, [batch_event(i, 5) for i in range(3, 9)] + [batch_event(1, 5, "other")])
    lane = lanes(rt)
    drive_until(lane, lambda: all(s != "pending" for s in statuses(rt).values()))

    with rt.sessions() as session:
        jobs = session.execute(sa.select(BatchJob.model, BatchJob.dimensions, BatchJob.lines)).all()
        rows = session.execute(
            sa.select(
                ProviderRequest.model, ProviderRequest.billed_tokens, ProviderRequest.cost_nano_cny
            ).where(ProviderRequest.api == "batch")
        ).all()
    assert sorted(tuple(j) for j in jobs) == [("text-embedding-v3", 512, 6), ("text-embedding-v4", 1024, 1)]
    assert all(cost == tokens * 250 for _m, tokens, cost in rows)  # half of 500 nano-CNY per token
    for i in range(3, 9):  # each document of the moved collection: v3/512 in the routed collection
        points = rt.store.document_points(V3, "default", f"d{i}")
        assert close_to(points, "text-embedding-v3", 512, text(i, 5)), i
        assert points[0].payload["version"] == 5
    assert close_to(
        rt.store.document_points(OTHER_V4, "default", "d1"), "text-embedding-v4", 1024, text(1, 5)
    )

    # the dual write: the follower brings the old collection up to what the batch lane settled
    run_until(rt, mig_id, "switched")
    while control.advance(rt, mig_id):
        pass
    assert_holds_sql(rt, V3)
    assert_holds_sql(rt, V4)
    assert versions(rt, V4)["d8"] == {5}
    report = balanced(rt, emulator)
    assert report.balanced, report.as_dict()
    ledger_equals_bill(rt, emulator)


def test_a_job_whose_collection_moved_meanwhile_is_embedded_again_with_the_new_model(
    make_runtime, emulator, lanes
):
    emulator.configure(batch_duration_s=0.3)
    rt = make_runtime(**FAST, reembed_settle_s=0.3, reembed_route_refresh_s=0.1)
    ingest_events(rt, [upsert(i, 1) for i in range(4)])
    drain(rt)
    ingest_events(rt, [batch_event(9, 2)])
    lane = lanes(rt)
    assert lane.tick().packed is not None  # a v4/1024 job for d9
    mig_id = control.start(rt, "documents", "text-embedding-v3", 512)
    run_until(rt, mig_id, "switched")
    drive_until(lane, lambda: statuses(rt)["d9"] == "indexed")
    with rt.sessions() as session:
        jobs = session.execute(sa.select(BatchJob.model).order_by(BatchJob.created_at)).scalars().all()
    assert jobs == ["text-embedding-v4", "text-embedding-v3"]  # handed back, then embedded again
    assert close_to(rt.store.document_points(V3, "default", "d9"), "text-embedding-v3", 512, text(9, 2))
    while control.advance(rt, mig_id):
        pass
    assert_holds_sql(rt, V3)
    assert_holds_sql(rt, V4)  # the old model's vectors of the first job served the dual write
    ledger_equals_bill(rt, emulator)


def test_reembed_on_the_batch_lane_switches_with_every_document_at_the_batch_price(
    make_runtime, emulator, lanes
):
    emulator.configure(batch_duration_s=0.3)
    rt = make_runtime(**FAST, reembed_settle_s=0.3, reembed_route_refresh_s=0.1)
    ingest_events(rt, [upsert(i, 1) for i in range(25)] + [{"op": "delete", "doc_id": "d3", "version": 2}])
    drain(rt)
    with rt.sessions() as session:
        before = session.execute(sa.select(sa.func.count()).select_from(ProviderRequest)).scalar_one()
    mig_id = control.start(rt, "documents", "text-embedding-v3", 512, lane="batch")
    lane = lanes(rt)
    deadline = time.monotonic() + 60
    while not ((mig := migration_row(rt, mig_id)).state == "switched" and mig.requested is None):
        assert time.monotonic() < deadline, mig.state
        control.advance(rt, mig_id)
        lane.step_jobs(batched.jobs(rt, mig))
        threading.Event().wait(0.05)

    assert_holds_sql(rt, V3)
    assert set(versions(rt, V3)) == {f"d{i}" for i in range(25) if i != 3}
    assert close_to(rt.store.document_points(V3, "default", "d7"), "text-embedding-v3", 512, text(7))
    with rt.sessions() as session:
        spent = session.execute(
            sa.select(
                ProviderRequest.lane,
                ProviderRequest.api,
                ProviderRequest.billed_tokens,
                ProviderRequest.cost_nano_cny,
            ).where(ProviderRequest.migration == V3)
        ).all()
        after = session.execute(sa.select(sa.func.count()).select_from(ProviderRequest)).scalar_one()
    assert [(lane_, api) for lane_, api, _t, _c in spent] == [
        ("batch", "batch")
    ]  # one job, nothing real-time
    assert spent[0][3] == spent[0][2] * 250 and after == before + 1
    batch_bill = [b for b in emulator.bill()["requests"] if b.get("api") == "batch"]
    assert len(batch_bill) == 24 and sum(b["tokens"] for b in batch_bill) == spent[0][2]
    report = balanced(rt, emulator)
    assert report.balanced, report.as_dict()
    ledger_equals_bill(rt, emulator)


def test_reembed_on_the_batch_lane_is_refused_where_the_batch_api_is_not_offered(make_runtime, emulator):
    rt = make_runtime(region="singapore")
    ingest_events(rt, [upsert(0, 1)])
    drain(rt)
    with pytest.raises(ConfigError, match=r"--lane batch is not available.*singapore"):
        control.start(rt, "documents", "text-embedding-v3", 512, lane="batch")


def statuses(rt) -> dict[str, str]:
    with rt.sessions() as session:
        return dict(session.execute(sa.select(Document.doc_id, Document.status)).all())


def migration_row(rt, mig_id: int) -> Migration:
    with rt.sessions() as session:
        found = session.get(Migration, mig_id)
        assert found is not None
        return found


def test_sidecar_reembed_lane_batch_as_a_process(database_url, emulator, tmp_path):
    """`sidecar reembed --lane batch` moves its own batch job along when no worker runs."""
    emulator.configure(batch_duration_s=0.3)
    settings = make_settings(database_url, emulator.url, tmp_path)
    schema.upgrade(settings.resolved_database_url())
    rt = build_runtime(settings)  # Qdrant Edge in the data dir, as the CLI will open it
    ingest_events(rt, [upsert(i, 1) for i in range(30)])
    drain(rt)
    engine = rt.engine
    rt.close()
    env = {**cli_env(settings, emulator), "SIDECAR_BATCH_POLL_INTERVAL_S": "0.1"}
    args = ("reembed", "documents", "--model", "text-embedding-v3", "--dimensions", "512", "--lane", "batch")
    run = sidecar(env, *args)
    assert run.returncode == 0, run.stderr
    assert f"switched (documents → {V3})" in run.stdout
    with engine.connect() as conn:
        spent = conn.execute(
            sa.select(
                ProviderRequest.api,
                ProviderRequest.rows,
                ProviderRequest.billed_tokens,
                ProviderRequest.cost_nano_cny,
            ).where(ProviderRequest.migration == V3)
        ).all()
    engine.dispose()
    assert [(api, rows) for api, rows, _t, _c in spent] == [("batch", 30)]
    assert spent[0][3] == spent[0][2] * 250
    ledger_equals_bill_of(settings, emulator)
    rt = build_runtime(settings)
    try:
        assert rt.store.aliases() == {"documents": V3} and rt.store.count("documents") == 30
    finally:
        rt.close()


def ledger_equals_bill_of(settings, emulator) -> None:
    engine = sa.create_engine(settings.resolved_database_url())
    try:
        with engine.connect() as conn:
            billed = conn.execute(sa.select(sa.func.sum(ProviderRequest.billed_tokens))).scalar_one()
    finally:
        engine.dispose()
    assert billed == emulator.bill()["total_tokens"]
