"""A cycle's provider calls (worker/pipeline.py): its batches go out in waves of up to
`request_concurrency` calls at once, because the provider's latency, not its limits, would
otherwise bound a loop's rate (50 ms a call caps one call at a time to 20 calls a second).

    wave: a limiter permit per call → one transaction: the budget check and every call's
    ledger intent → the calls, at once → one transaction: every call's result and the vectors
    it paid for (the embedding cache)

A wave whose calls together would pass a budget cap goes call by call, each checked on its own
(so a cap lets through what fits). A call that fails is closed in the ledger on its own; one
that a single row spoils (moderation) is narrowed down to that row, call by call. A crash
between an answer and the results' transaction leaves `sent` rows with their estimates, which
the reconciler closes (worker/reconciler.py) and `sidecar bill` settles against the bill.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from concurrent.futures import wait
from dataclasses import dataclass

from worker import batching, telemetry
from worker.cycle import Cycle, Work
from worker.embedding.base import EmbedResult
from worker.errors import GiveUp, RetryLater, SidecarError
from worker.ledger import calls
from worker.limiter.base import Permit
from worker.runtime import Runtime
from worker.sql import cache, documents, pauses

log = logging.getLogger("worker.pipeline")  # these lines were the pipeline's, and keep its name

Rows = list[batching.Row]


@dataclass
class _Call:
    rows: Rows
    est_tokens: int
    permit: Permit
    request_id: str = ""


def embed_batches(rt: Runtime, work: Work, batches: list[Rows], cycle: Cycle) -> None:
    """Embed the batches a wave at a time, renewing the leases in a long cycle; stop when the
    provider asks to back off (the rest wait for a later cycle)."""
    width = 1 if work.probing else rt.settings.request_concurrency  # a probe goes alone
    renewed = time.monotonic()
    for start in range(0, len(batches), width):
        if time.monotonic() - renewed > rt.settings.lease_s / 3:  # a long cycle keeps its leases
            with rt.sessions.begin() as session:
                documents.renew(session, work.docs, owner=rt.owner, lease_s=rt.settings.lease_s)
            renewed = time.monotonic()
        if not embed_wave(rt, work, batches[start : start + width], cycle):
            return


def embed_rows(rt: Runtime, work: Work, rows: Rows, cycle: Cycle) -> bool:
    """One batch as a wave of its own; False when the provider or the limiter asks everyone to wait."""
    return embed_wave(rt, work, [rows], cycle)


def embed_wave(rt: Runtime, work: Work, wave: list[Rows], cycle: Cycle) -> bool:
    """Embed these batches at once; False when the provider or the limiter asks everyone to wait."""
    started: list[_Call] = []
    try:
        for rows in wave:
            est_tokens = sum(row.tokens for row in rows)
            permit = rt.limiter.acquire(est_tokens, timeout_s=rt.settings.lease_s / 4)
            started.append(_Call(rows, est_tokens, permit))
    except RetryLater as exc:  # the limiter's wait ran out: the batches without a permit wait
        for rows in wave[len(started) :]:
            _failed(work, rows, exc)
    if not started:
        return False
    try:
        _open_requests(rt, work, started)
    except RetryLater as exc:  # held back by a budget cap: the slots were not used
        for call in started:
            rt.limiter.settle(call.permit, 0)
        if len(started) > 1:  # together they pass a cap: one by one, each checked on its own
            return all(embed_rows(rt, work, call.rows, cycle) for call in started)
        _failed(work, started[0].rows, exc)
        return False
    cycle.requests += len(started)
    sent, computed = time.monotonic(), time.thread_time()
    outcomes = _send(rt, started)
    cycle.waited_s += (time.monotonic() - sent) - (time.thread_time() - computed)  # off this thread's CPU
    _record(rt, work, started, outcomes, cycle)
    go_on = len(started) == len(wave)
    for call, outcome in zip(started, outcomes, strict=True):
        if isinstance(outcome, SidecarError):
            go_on = _after_failure(rt, work, call, outcome, cycle) and go_on
    return go_on


def _send(rt: Runtime, started: list[_Call]) -> list[EmbedResult | SidecarError]:
    """Every call of the wave at once: the first on this thread, the others on the call pool."""
    others = [rt.calls.submit(contextvars.copy_context().run, _one_call, rt, call) for call in started[1:]]
    try:
        first = _one_call(rt, started[0])
    except BaseException:  # a crash (or a bug): the other calls end before the cycle gives up
        wait(others)
        raise
    return [first, *(future.result() for future in others)]


def _one_call(rt: Runtime, call: _Call) -> EmbedResult | SidecarError:
    rt.faults.reach("before_call")
    try:
        result = telemetry.embedded(
            rt.embedder, [row.text for row in call.rows], call.est_tokens, call.request_id
        )
    except SidecarError as exc:
        return exc
    rt.faults.reach("after_call")
    return result


def _record(
    rt: Runtime, work: Work, started: list[_Call], outcomes: list[EmbedResult | SidecarError], cycle: Cycle
) -> None:
    """The successes' ledger results and the vectors they paid for, in one transaction."""
    paid: list[tuple[_Call, EmbedResult, dict[str, cache.Embedded]]] = []
    for call, outcome in zip(started, outcomes, strict=True):
        if isinstance(outcome, EmbedResult):
            rt.limiter.settle(call.permit, outcome.billed_tokens)
            sparse = [*outcome.sparse] if outcome.sparse else [None] * len(call.rows)
            vectors = {
                row.key: cache.Embedded(vector, weights)
                for row, vector, weights in zip(call.rows, outcome.vectors, sparse, strict=True)
            }
            paid.append((call, outcome, vectors))
    if not paid:
        return
    model, dimensions = rt.embedder.model, rt.embedder.dimensions
    with rt.sessions.begin() as session:
        for call, result, vectors in paid:
            cost = rt.spec.cost_nano_cny(result.billed_tokens)
            calls.record_success(session, call.request_id, result, cost)
            cache.put_many(session, vectors, model=model, dimensions=dimensions, request_id=call.request_id)
        if work.probing:
            pauses.clear(session)
            work.probing = False
    rt.faults.reach("after_ledger")
    for call, result, vectors in paid:
        work.vectors.update(vectors)
        cycle.rows += len(call.rows)
        log.info(
            "embed.done request_id=%s rows=%d tokens=%d ms=%.0f",
            result.request_id,
            len(call.rows),
            result.billed_tokens,
            result.latency_ms,
        )


def _after_failure(rt: Runtime, work: Work, call: _Call, exc: SidecarError, cycle: Cycle) -> bool:
    """Close a failed call's ledger row; narrow a spoiling row down; False to stop the cycle."""
    rt.limiter.settle(call.permit, 0)
    if exc.call is not None and exc.call.http_status == 429:
        rt.limiter.throttled(getattr(exc, "retry_after_s", None), permit=call.permit)
    record_failure(rt, call.request_id, call.est_tokens, exc)
    log.warning("embed.failed id=%s rows=%d error=%s", call.request_id, len(call.rows), type(exc).__name__)
    if not isinstance(exc, RetryLater | GiveUp):
        raise exc
    rows = call.rows
    if exc.narrow and len(rows) > 1:  # one row spoils the batch: narrow it down to that row
        half = len(rows) // 2
        return embed_rows(rt, work, rows[:half], cycle) and embed_rows(rt, work, rows[half:], cycle)
    if exc.narrow:
        for doc, _chunk in work.users[rows[0].key]:
            work.errors[doc.id] = exc
        return True
    _failed(work, rows, exc)
    return False


def _failed(work: Work, rows: Rows, exc: SidecarError) -> None:
    for row in rows:
        for doc, _chunk in work.users[row.key]:
            work.errors.setdefault(doc.id, exc)


def _open_requests(rt: Runtime, work: Work, started: list[_Call]) -> None:
    """The ledger's intent rows of a wave, after the budget check of their joint estimate, in its
    transaction (no joint overshoot of a cap); sets each call's request id."""
    with rt.sessions.begin() as session:
        if rt.budget_check is not None:
            collections = {
                doc.collection for call in started for row in call.rows for doc, _ in work.users[row.key]
            }
            rt.budget_check(session, collections, sum(call.est_tokens for call in started))
        for call in started:
            call.request_id = str(uuid.uuid4())
            users = [user for row in call.rows for user in work.users[row.key]]
            calls.open_request(
                session,
                request_id=call.request_id,
                model=rt.embedder.model,
                dimensions=rt.embedder.dimensions,
                api=rt.embedder.api,
                rows=len(call.rows),
                est_tokens=call.est_tokens,
                items=[calls.ItemRef(d.id, d.version, c.index, c.content_hash, c.tokens) for d, c in users],
                attempt=max(doc.attempts for doc, _ in work.users[call.rows[0].key]),
                key_fingerprint=rt.settings.key_fingerprint(),
                worker=rt.owner,
            )


def record_failure(rt: Runtime, request_id: str, est_tokens: int, exc: SidecarError) -> None:
    """Close the ledger row of a failed call: at its estimate when the provider may have billed
    it; an account error also pauses every process's calls."""
    with rt.sessions.begin() as session:
        calls.record_failure(
            session,
            request_id,
            exc.call,
            message=str(exc),
            unknown_cost_nano=rt.spec.cost_nano_cny(est_tokens) if exc.maybe_charged else None,
        )
        if exc.pauses_everyone:
            pauses.pause(session, f"provider account error: {exc}", for_s=rt.settings.account_pause_s)
