"""The batch lane's loop: one thread per worker process (started by worker/service.py).

Each tick: if the Batch API cannot serve us (region, model, settings), move waiting batch-lane
documents to the real-time lane and say so; else pack a job when documents have waited
`batch_collect_s` (or fill a job), then move every due job one step along, under a job lease so
that processes never work one job at once:

    packed   → upload the input file                       → uploaded
    uploaded → find the job by its ds_name, else create it → submitted (a crash between create
               and our commit finds the job again: never paid twice)
    submitted → poll every `batch_poll_interval_s`; once the provider is done, read the output and
               error files, cache the vectors, close the ledger row  → imported
    imported → write the documents (version guard); hand back failed lines' documents → done
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.batch import importing, packing
from worker.batch.client import BatchClient
from worker.batch.report import unavailable_reason
from worker.errors import SidecarError
from worker.ledger.budget import BudgetExceeded
from worker.runtime import Runtime
from worker.sql.batch_models import BatchJob
from worker.sql.models import Document, ProviderRequest, utcnow

log = logging.getLogger(__name__)
PROVIDER_DONE = ("completed", "failed", "expired", "cancelled")
ACTIVE = ("packed", "uploaded", "submitted", "imported")
MAX_PACKS_PER_TICK = 8


@dataclass
class Tick:
    packed: str | None = None
    steps: int = 0
    moved_to_realtime: int = 0


class BatchLane:
    """The lane over one Runtime. `crash_at` (tests only) raises at a named point of a step, as
    if the process died there: "after_upload", "after_create", "after_record"."""

    def __init__(self, rt: Runtime, *, owner: str | None = None, client: BatchClient | None = None) -> None:
        self.rt = rt
        self.owner = owner or f"{rt.process}:batch"
        self.client = client or BatchClient.from_settings(rt.settings)
        self.crash_at: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sidecar-batch", daemon=True)
        self._said_unavailable = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.client.close()

    def _loop(self) -> None:
        tick_s = max(0.05, min(5.0, self.rt.settings.batch_poll_interval_s))
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # an outage or a bug must not end the loop; SQL keeps every job
                log.exception("batch.tick_failed")
            self._stop.wait(tick_s)

    def tick(self) -> Tick:
        """One round: fall back, pack, then step every due job once."""
        done = Tick()
        reason = unavailable_reason(self.rt.settings)
        if reason is not None:
            done.moved_to_realtime = self._to_realtime(reason)
            return done
        for _ in range(MAX_PACKS_PER_TICK):  # one job per model: a tick may pack a few
            packed = self._maybe_pack()
            if packed is None:
                break
            done.packed = done.packed or packed
        while (job_id := self._lease_due_job()) is not None:
            self.step(job_id)
            done.steps += 1
            if self._stop.is_set():
                break
        return done

    def _to_realtime(self, reason: str) -> int:
        with self.rt.sessions.begin() as session:
            moved = session.execute(
                sa.update(Document)
                .where(Document.status == "pending", Document.lane == "batch")
                .values(lane="realtime")
                .execution_options(synchronize_session=False)
            )
        count = int(getattr(moved, "rowcount", 0) or 0)
        if count or not self._said_unavailable:
            log.warning("batch.unavailable reason=%s moved_to_realtime=%d", reason, count)
            self._said_unavailable = True
        if count:
            self.rt.wake.set()
        return count

    def _maybe_pack(self) -> str | None:
        settings = self.rt.settings
        with self.rt.sessions() as session:
            count, oldest = packing.waiting(session)
        if not count:
            return None
        waited_s = (utcnow() - oldest).total_seconds() if oldest else 0.0
        if count < settings.batch_max_lines and waited_s < settings.batch_collect_s:
            return None
        packing.register_waiting(self.rt)  # routes first: packing reads them in its transaction
        try:
            with self.rt.sessions.begin() as session:
                job_id = packing.pack(self.rt, session)
        except BudgetExceeded as exc:
            log.warning("batch.budget_held reason=%s", str(exc)[:200])
            return None
        if job_id is not None:
            log.info("batch.packed job=%s", job_id)
        return job_id

    def step_jobs(self, job_ids: Collection[str]) -> int:
        """Step each of these jobs that is due and free once (a re-embed's batch jobs, moved on
        by `sidecar reembed --lane batch` in its own process); how many steps."""
        steps = 0
        while steps < len(job_ids) and (job_id := self._lease_due_job(only=job_ids)) is not None:
            self.step(job_id)
            steps += 1
        return steps

    def _lease_due_job(self, only: Collection[str] | None = None) -> str | None:
        now = utcnow()
        with self.rt.sessions.begin() as session:
            job = session.execute(
                sa.select(BatchJob)
                .where(BatchJob.state.in_(ACTIVE), BatchJob.due_at <= now)
                .where(BatchJob.id.in_(sorted(only)) if only is not None else sa.true())
                .where(sa.or_(BatchJob.lease_until.is_(None), BatchJob.lease_until < now))
                .order_by(BatchJob.due_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job is None:
                return None
            job.lease_owner = self.owner
            job.lease_until = now + dt.timedelta(seconds=self.rt.settings.lease_s)
            return job.id

    def step(self, job_id: str) -> None:
        """Move one leased job one step; a failure is recorded on the job and retried later."""
        with self.rt.sessions() as session:
            job = session.get(BatchJob, job_id)
            if job is None:
                return
            session.expunge(job)
        try:
            getattr(self, f"_{job.state}")(job)
        except SidecarError as exc:
            self._later(job_id, f"{type(exc).__name__}: {exc}", delay_s=self._backoff_s(exc))
            log.warning("batch.step_failed job=%s state=%s error=%s", job_id, job.state, type(exc).__name__)

    def _backoff_s(self, exc: SidecarError) -> float:
        return 60.0 if exc.pauses_everyone else min(60.0, self.rt.settings.batch_poll_interval_s)

    def _packed(self, job: BatchJob) -> None:
        with self.rt.sessions() as session:
            content = packing.input_file(session, job)
        file_id = self.client.upload(content, f"sidecar-{job.id}.jsonl")
        self._reach("after_upload")
        self._update(job.id, state="uploaded", input_file_id=file_id)
        log.info("batch.uploaded job=%s file=%s lines=%d", job.id, file_id, job.lines)

    def _uploaded(self, job: BatchJob) -> None:
        found = self.client.find(job.id)
        if found is None:
            assert job.input_file_id is not None
            found = self.client.create(
                job.input_file_id, completion_window=self.rt.settings.batch_completion_window, ds_name=job.id
            )
        self._reach("after_create")
        batch_id = str(found["id"])
        with self.rt.sessions.begin() as session:
            self._set(
                session,
                job.id,
                state="submitted",
                provider_batch_id=batch_id,
                provider_status=str(found.get("status")),
                submitted_at=utcnow(),
                due_in_s=self._poll_s(),
            )
            request = session.get(ProviderRequest, job.id)
            if request is not None:
                request.provider_request_id = batch_id
        log.info("batch.submitted job=%s batch=%s", job.id, batch_id)

    def _submitted(self, job: BatchJob) -> None:
        assert job.provider_batch_id is not None
        found = self.client.retrieve(job.provider_batch_id)
        status = str(found.get("status"))
        if status not in PROVIDER_DONE:
            self._update(job.id, provider_status=status, due_in_s=self._poll_s())
            return
        self._renew(job.id)  # downloading and reading a big job's files takes a while
        output = self.client.content(found["output_file_id"]) if found.get("output_file_id") else b""
        error = self.client.content(found["error_file_id"]) if found.get("error_file_id") else b""
        answers = importing.read_files(output, error, job.dimensions)
        with self.rt.sessions.begin() as session:
            record = session.get(BatchJob, job.id)
            assert record is not None
            record.output_file_id = found.get("output_file_id")
            record.error_file_id = found.get("error_file_id")
            importing.record_answers(self.rt, session, record, answers, provider_status=status)
            record.due_at = utcnow()
        self._reach("after_record")
        log.info(
            "batch.imported job=%s status=%s lines=%d answered=%d",
            job.id,
            status,
            job.lines,
            len(answers.vectors),
        )
        self._imported(job)

    def _imported(self, job: BatchJob) -> None:
        with self.rt.sessions() as session:
            job = session.get(BatchJob, job.id) or job
            session.expunge(job)
        failed_job = job.provider_status == "failed"  # the provider refused the file: counts an attempt
        written = importing.write_documents(
            self.rt, job, counts_attempt=failed_job, renew=lambda: self._renew(job.id)
        )
        self._update(job.id, state="done", finished_at=utcnow(), lease_owner=None, lease_until=None)
        if written.retried:
            self.rt.wake.set()
        log.info(
            "batch.done job=%s indexed=%d retried=%d dead=%d superseded=%d",
            job.id, written.indexed, written.retried, written.dead, written.superseded,
        )  # fmt: skip

    def _renew(self, job_id: str) -> None:
        """Keep the job's lease through a long step (a big job's documents take a while)."""
        until = utcnow() + dt.timedelta(seconds=self.rt.settings.lease_s)
        self._update(job_id, lease_owner=self.owner, lease_until=until)

    def _poll_s(self) -> float:
        return self.rt.settings.batch_poll_interval_s

    def _reach(self, point: str) -> None:
        if self.crash_at == point:
            raise SystemExit(f"batch lane crashed at {point} (test)")

    def _later(self, job_id: str, error: str, *, delay_s: float) -> None:
        self._update(job_id, last_error=error[:2000], due_in_s=delay_s, lease_owner=None, lease_until=None)

    def _update(self, job_id: str, *, due_in_s: float | None = None, **values: object) -> None:
        with self.rt.sessions.begin() as session:
            self._set(session, job_id, due_in_s=due_in_s, **values)

    def _set(self, session: Session, job_id: str, *, due_in_s: float | None = None, **values: object) -> None:
        if due_in_s is not None:
            values["due_at"] = utcnow() + dt.timedelta(seconds=due_in_s)
        if "state" in values or due_in_s is not None:  # a step ends: the job is free for any process
            values.setdefault("lease_owner", None)
            values.setdefault("lease_until", None)
        step_from = {
            "uploaded": "packed",
            "submitted": "uploaded",
            "imported": "submitted",
            "done": "imported",
        }
        where = [BatchJob.id == job_id]
        if isinstance(values.get("state"), str) and values["state"] in step_from:
            # A step whose lease ran out meanwhile (a very slow upload) never moves a job back.
            where.append(BatchJob.state == step_from[str(values["state"])])
        session.execute(
            sa.update(BatchJob).where(*where).values(**values).execution_options(synchronize_session=False)
        )
