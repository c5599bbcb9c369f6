"""The Batch File API's state: uploaded files, batch jobs, their life cycle and their results.

Life cycle (the provider's, as in README.md), compressed into `batch_duration_s` from creation:
validating (first 10 %) → in_progress (to 80 %) → finalizing (to 100 %) → completed; or failed
at once when the input file breaks a rule (lines per job, line size, one model per file,
duplicate `custom_id`, unknown model, a line not for the job's endpoint), expired (a share
`batch_expire_rate` of jobs: half their lines done, the rest in the error file as
`batch_expired`), or cancelling → cancelled (lines done so far kept). Each line is embedded as
the real-time compatible endpoint would; a share `batch_fail_rate` of lines fails with a 500.
Output and error files hold one line per input line; every charged line goes on the bill with
`"api": "batch"`, its batch id and its cost at the batch price.

Jobs advance lazily, whenever one is read (or the bill is), so no thread runs behind the server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.emulator import errors
from api.emulator.answers import answer_body
from api.emulator.batch_input import ENDPOINT, BatchError, job_request, read_input, window_s
from api.emulator.config import EmulatorConfig
from api.emulator.parsing import parse
from worker.catalog import MODELS, cny_str

MAX_FILE_BYTES = 500 * 1024 * 1024
MAX_FILES = 10_000
MAX_UNFINISHED_JOBS = 1_000
TERMINAL = ("completed", "failed", "expired", "cancelled")
OUTPUT_PREFIX = "file-batch_output-"  # only these are downloadable


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class Job:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: float
    duration_s: float
    lines: list[dict[str, Any]]  # the parsed input lines
    status: str = "validating"
    errors: list[dict[str, Any]] = field(default_factory=list)
    expires: bool = False  # drawn at creation: this job will expire with partial output
    stamps: dict[str, float] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    cancel_at: float | None = None
    results: list[LineResult] | None = None  # every line's answer, worked out while the job runs
    ready: threading.Event = field(default_factory=threading.Event)

    def public(self) -> dict[str, Any]:
        status = "finalizing" if self.status == "running" else self.status
        stamp = {name: int(self.stamps[name]) if name in self.stamps else None for name in _STAMPS}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "expires_at": int(self.created_at + window_s(self.completion_window)),
            **stamp,
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }


_STAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class BatchStore:
    """Files and jobs of one emulator; every method takes the lock itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}

    # --- files --------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        if purpose != "batch":
            raise BatchError(400, "invalid_parameter_error", "purpose must be batch", "purpose")
        if len(content) > MAX_FILE_BYTES:
            raise BatchError(400, "invalid_file", "The file exceeds the 500 MB limit.", "file")
        with self.lock:
            if len(self.files) >= MAX_FILES:
                raise BatchError(400, "file_capacity_exceeded", "Upload file capacity exceed limit")
            stored = StoredFile(
                f"file-batch-{uuid.uuid4().hex}", filename, purpose, content, int(time.time())
            )
            self.files[stored.id] = stored
            return stored

    def get_file(self, file_id: str) -> StoredFile:
        with self.lock:
            stored = self.files.get(file_id)
        if stored is None:
            raise BatchError(404, "not_found", f"No such file: {file_id}", "file_id")
        return stored

    def file_content(self, file_id: str) -> bytes:
        stored = self.get_file(file_id)
        if not file_id.startswith(OUTPUT_PREFIX):
            raise BatchError(403, "access_denied", "Only batch output and error files can be downloaded.")
        return stored.content

    # --- jobs ---------------------------------------------------------------------------------

    def create_job(self, body: dict[str, Any], config: EmulatorConfig, expires: bool) -> Job:
        """Check the request, then the input file; a file that breaks a rule fails the job at once."""
        file_id, window, metadata = job_request(body)
        stored = self.get_file(file_id)
        with self.lock:
            unfinished = sum(job.status not in TERMINAL for job in self.jobs.values())
        if unfinished >= MAX_UNFINISHED_JOBS:
            raise BatchError(429, "too_many_jobs", "At most 1,000 unfinished batch jobs per account.")
        now = time.time()
        lines, problems = read_input(stored.content, config)
        job = Job(
            id=f"batch_{uuid.uuid4()}",
            input_file_id=file_id,
            completion_window=window,
            metadata=metadata,
            created_at=now,
            duration_s=config.batch_duration_s,
            lines=lines,
            expires=expires,
        )
        job.counts["total"] = len(lines)
        if problems:
            job.status, job.errors = "failed", problems
            job.stamps["failed_at"] = now
        with self.lock:
            self.jobs[job.id] = job
        return job

    def get_job(self, batch_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(batch_id)
        if job is None:
            raise BatchError(404, "not_found", f"No such batch: {batch_id}", "batch_id")
        return job

    def list_jobs(self, after: str | None, limit: int, ds_name: str | None) -> tuple[list[Job], bool]:
        """Newest first, after the job `after` (a cursor), at most `limit`; and whether more follow."""
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
        if ds_name is not None:
            jobs = [j for j in jobs if (j.metadata or {}).get("ds_name") == ds_name]
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    def cancel(self, batch_id: str) -> Job:
        job = self.get_job(batch_id)
        with self.lock:
            if job.status in TERMINAL:
                raise BatchError(400, "invalid_status", f"A {job.status} batch cannot be cancelled.")
            if job.cancel_at is None:
                job.cancel_at = time.time()
                job.stamps["cancelling_at"] = job.cancel_at
                job.status = "cancelling"
        return job

    def jobs_to_finish(self, now: float) -> list[Job]:
        """Jobs whose time has come to finish: they are marked so that one caller runs each."""
        due = []
        with self.lock:
            for job in self.jobs.values():
                if job.status in TERMINAL or job.status == "running":
                    continue
                if job.cancel_at is not None or now >= job.created_at + job.duration_s:
                    due.append(job)
                else:
                    job.status = _phase(job, now)
                    if job.status != "validating":
                        job.stamps.setdefault("in_progress_at", job.created_at + 0.1 * job.duration_s)
                    if job.status == "finalizing":
                        job.stamps.setdefault("finalizing_at", job.created_at + 0.8 * job.duration_s)
        return due

    def finish_due(
        self,
        config: EmulatorConfig,
        draw: Callable[[float], bool],
        charge: Callable[[list[dict[str, Any]]], None],
    ) -> None:
        """Run every job whose time has come: its lines embedded, files stored, lines charged."""
        now = time.time()
        for job in self.jobs_to_finish(now):
            with self.lock:
                if job.status == "running":
                    continue
                job.status = "running"  # shown as finalizing
            if not job.ready.wait(timeout=600):  # a job created by an older caller: work it out now
                self.precompute(job, config, [draw(config.batch_fail_rate) for _ in job.lines])
            final, outcome = run_job(job, now)
            charge(outcome.bill)
            self._store_outcome(job, final, outcome, now)

    def precompute(self, job: Job, config: EmulatorConfig, draws: list[bool]) -> None:
        """Work out every line's answer (the slow part) while the job's clock runs; `draws` says
        which lines fail by injected fault (drawn by the caller from the seeded RNG)."""
        if job.results is None:
            job.results = [
                _run_line(job, line, config, fail) for line, fail in zip(job.lines, draws, strict=True)
            ]
        job.ready.set()

    def _store_outcome(self, job: Job, final: str, outcome: Outcome, now: float) -> None:
        output = "".join(f"{line}\n" for line in outcome.output).encode()
        error = "".join(f"{line}\n" for line in outcome.error).encode()
        with self.lock:
            if output:
                job.output_file_id = f"{OUTPUT_PREFIX}{uuid.uuid4().hex}"
                self.files[job.output_file_id] = StoredFile(
                    job.output_file_id, "output.jsonl", "batch_output", output, int(now)
                )
            if error:
                job.error_file_id = f"{OUTPUT_PREFIX}error-{uuid.uuid4().hex}"
                self.files[job.error_file_id] = StoredFile(
                    job.error_file_id, "error.jsonl", "batch_output", error, int(now)
                )
            job.counts.update(completed=outcome.completed, failed=outcome.failed)
            job.stamps.setdefault("in_progress_at", job.created_at + 0.1 * job.duration_s)
            if final == "completed":
                job.stamps.setdefault("finalizing_at", job.created_at + 0.8 * job.duration_s)
            job.stamps[f"{final}_at"] = now
            job.status = final
            job.lines, job.results = [], None  # the input stays in its file, the answers in theirs


def _phase(job: Job, now: float) -> str:
    share = (now - job.created_at) / job.duration_s if job.duration_s > 0 else 1.0
    return "validating" if share < 0.1 else "in_progress" if share < 0.8 else "finalizing"


# --- running a job --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What finishing one job produced: its files, bill entries and counts."""

    output: list[str] = field(default_factory=list)
    error: list[str] = field(default_factory=list)
    bill: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0


@dataclass
class LineResult:
    """One line's answer: the line of the output (ok) or error file, and its bill entry."""

    text: str
    ok: bool
    bill: dict[str, Any] | None = None


def run_job(job: Job, now: float) -> tuple[str, Outcome]:
    """Finish a due job from its worked-out lines: its final status and what it produced."""
    results = job.results or []
    if job.cancel_at is not None:
        final, reason = "cancelled", ("batch_cancelled", "The batch was cancelled before this line ran.")
        elapsed = (job.cancel_at - job.created_at) / job.duration_s if job.duration_s > 0 else 1.0
        done = round(len(results) * max(0.0, min(1.0, (elapsed - 0.1) / 0.7)))
    elif job.expires:
        final, reason = "expired", ("batch_expired", "The batch expired before this line ran.")
        done = len(results) // 2
    else:
        final, reason, done = "completed", ("", ""), len(results)
    outcome = Outcome()
    for index, (line, result) in enumerate(zip(job.lines, results, strict=True)):
        if index >= done:
            outcome.error.append(_line_json(line, None, {"code": reason[0], "message": reason[1]}))
            outcome.failed += 1
        elif result.ok and result.bill is not None:
            outcome.output.append(result.text)
            outcome.completed += 1
            outcome.bill.append({**result.bill, "at": now})
        else:
            outcome.error.append(result.text)
            outcome.failed += 1
    return final, outcome


def _run_line(job: Job, line: dict[str, Any], config: EmulatorConfig, fail: bool) -> LineResult:
    request_id = str(uuid.uuid4())
    try:
        call = parse("compatible", line["body"], config)
        if any(config.inspection_marker in t for t in call.texts):
            raise errors.inspection_failed()
        if fail:  # an injected fault, after the input's own checks
            raise errors.internal()
    except errors.ProviderError as exc:
        body = exc.body("compatible", request_id)
        response = {"status_code": exc.status, "request_id": request_id, "body": body}
        error = {"code": exc.compat_code, "message": exc.compat_message}
        return LineResult(_line_json(line, response, error), ok=False)
    body = answer_body("compatible", call, request_id)
    response = {"status_code": 200, "request_id": request_id, "body": body}
    cost = MODELS[call.spec.name].cost_nano_cny(call.tokens, batch=True)
    bill = {
        "request_id": request_id,
        "model": call.spec.name,
        "api": "batch",
        "tokens": call.tokens,
        "at": 0.0,  # set when the job finishes
        "batch_id": job.id,
        "custom_id": line["custom_id"],
        "cost_cny": cny_str(cost),
    }
    return LineResult(_line_json(line, response, None), ok=True, bill=bill)


def _line_json(line: dict[str, Any], response: dict[str, Any] | None, error: dict[str, Any] | None) -> str:
    out = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line["custom_id"],
        "response": response,
        "error": error,
    }
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))
