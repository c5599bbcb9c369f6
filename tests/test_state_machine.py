"""A Hypothesis state machine over the whole pipeline in-process, with crashes at every step.

Rules create, update, delete, duplicate and reorder events, switch provider faults, and crash
the pipeline at each named point (the exception escapes like a killed process: leases and
`sent` ledger rows stay behind). `drain` then plays time forward — leases expire, the reconciler
runs — and the invariants must hold: the store equals the model of what was sent, and the
ledger's tokens equal the emulator's bill.
"""

from __future__ import annotations

import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from worker import chunking, pipeline, reconciler
from worker.ledger import calls
from worker.limiter.base import Permit
from worker.runtime import Faults
from worker.sql import models
from worker.sql.models import utcnow
from worker.tasks import ingest_events

CRASH_POINTS = Faults.POINTS
DOCS = ("a", "b", "c", "d")
TEXTS = ("short note", "another short note", " ".join(f"word{i}." for i in range(120)), "short note")


class SimulatedCrash(BaseException):
    """Not an Exception: nothing in the pipeline catches it, as nothing survives a SIGKILL."""


class FreeLimiter:
    def acquire(self, tokens: int, *, timeout_s: float) -> Permit:
        return Permit(tokens=tokens, granted_at=0.0)

    def settle(self, permit: Permit, billed_tokens: int) -> None:
        pass

    def throttled(self, retry_after_s: float | None = None, *, permit: Permit | None = None) -> float:
        return 0.0


def make_machine(rt, emulator):
    class Pipeline(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            with rt.sessions.begin() as session:
                for table in reversed(models.Base.metadata.sorted_tables):
                    session.execute(table.delete())
            for collection in rt.store.client.get_collections().collections:
                rt.store.client.delete_collection(collection.name)
            rt.store.forget_collections()  # the store caches which collections exist
            emulator.reset()
            self.model: dict[str, tuple[int, str | None]] = {}
            self.sent: list[dict] = []

        def _send(self, event: dict) -> None:
            self.sent.append(event)
            ingest_events(rt, [event])

        @rule(doc=st.sampled_from(DOCS), text=st.sampled_from(TEXTS), step=st.integers(1, 3))
        def upsert(self, doc, text, step):
            version = self.model.get(doc, (0, None))[0] + step
            self.model[doc] = (version, text)
            self._send({"op": "upsert", "doc_id": doc, "version": version, "text": text})

        @rule(doc=st.sampled_from(DOCS))
        def delete(self, doc):
            version = self.model.get(doc, (0, None))[0] + 1
            self.model[doc] = (version, None)
            self._send({"op": "delete", "doc_id": doc, "version": version})

        @precondition(lambda self: self.sent)
        @rule(data=st.data())
        def resend_old(self, data):
            """A duplicate or a reordered (older) event: the version rule ignores it."""
            self._send(data.draw(st.sampled_from(self.sent)))

        @rule(point=st.sampled_from(CRASH_POINTS))
        def crash(self, point):
            rt.faults.arm(point, SimulatedCrash(point))
            try:
                pipeline.run_cycle(rt)
            except SimulatedCrash:
                pass
            finally:
                rt.faults.disarm()

        @rule(error_rate=st.sampled_from([0.0, 0.0, 0.5]))
        def provider_faults(self, error_rate):
            emulator.configure(error_rate=error_rate)

        @rule()
        def step(self):
            pipeline.run_cycle(rt)

        @invariant()
        def drained_store_equals_model_and_ledger_equals_bill(self):
            drain(rt, emulator)
            for doc in DOCS:
                points = rt.store.document_points("documents", "default", doc)
                version, text = self.model.get(doc, (None, None))
                if text is None:
                    assert points == [], f"{doc}: deleted or never sent, yet visible"
                    continue
                expected = chunking.split_text(
                    text, max_tokens=rt.chunk_max_tokens, overlap_tokens=rt.settings.chunk_overlap_tokens
                )
                assert [(p.payload["version"], p.payload["text"]) for p in points] == [
                    (version, c.text) for c in expected
                ], f"{doc}: store differs from the model"
            with rt.sessions() as session:
                ledger_tokens = session.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(models.ProviderRequest.billed_tokens), 0))
                ).scalar_one()
                open_rows = session.execute(
                    sa.select(sa.func.count()).where(models.ProviderRequest.status == "sent")
                ).scalar_one()
            assert open_rows == 0
            assert ledger_tokens == emulator.bill()["total_tokens"]

    return Pipeline


def drain(rt, emulator) -> None:
    """Play time forward until nothing is pending: faults off, leases and backoffs expire,
    abandoned ledger rows are closed, and the reconciler repairs drift."""
    emulator.configure(error_rate=0.0)
    for _ in range(20):
        with rt.sessions.begin() as session:
            session.execute(sa.update(models.Document).values(lease_until=None, lease_owner=None))
            calls.close_abandoned(session, older_than=utcnow())
        reconciler.reconcile(rt)
        while not pipeline.run_cycle(rt).idle:
            pass
        with rt.sessions() as session:
            pending = session.execute(
                sa.select(sa.func.count()).where(models.Document.status == "pending")
            ).scalar_one()
        if not pending:
            return
    raise AssertionError("work did not drain")


def test_pipeline_state_machine(make_runtime, emulator):
    rt = make_runtime(chunk_max_tokens=40, chunk_overlap_tokens=0, claim_docs=3)
    rt.limiter = FreeLimiter()
    run_state_machine_as_test(
        make_machine(rt, emulator),
        settings=settings(
            max_examples=20, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
