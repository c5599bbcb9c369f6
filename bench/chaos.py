"""Chaos run: the whole pipeline under kills, provider faults and a broker restart, then a checker.

    python -m bench.chaos --events 5000 --docs 500

What it does (research/reliability.md §6 and §8 scenarios 1 and 6):
- starts its own redis-server (AOF, fsync always) on a free loopback port, the emulator as its own
  process answering 10 % 5xx and 5 % 429, a fresh PostgreSQL database (`sidecar migrate`) and one
  `sidecar worker --pool threads` on local-mode Qdrant;
- publishes seeded events through Celery (`sidecar.ingest_many` batches and single
  `sidecar.ingest`): new versions (some 2-3 chunks long, so documents grow and shrink), deletes,
  exact duplicates and reordered versions (an older version sent after a newer one). A publish that
  fails is retried with backoff, never dropped: publishing is the application's job;
- mixes in a poison share (`--poison-share`, default 2 % of the messages): foreign entries pushed
  raw on the queue list, lone surrogates, NUL and trailing newlines in fields, a document at
  the largest version then a version-less event for it, a 100-character task id, 200 levels of
  metadata. They must become rejections or documents of their own and hold nothing else up;
- SIGKILLs the worker every 2-6 s (seeded) and restarts it at once, while events are being
  published or the backlog is not empty; restarts Redis once mid-run (SIGTERM, then the same port
  and directory, so the AOF keeps queued messages);
- waits for quiescence: every document of the model at its model version and finished in SQL, no
  ledger row left `sent`, the broker queue empty and the reconciler given two rounds after the
  last restart;
- stops the worker and checks the final state against the model of what was sent:
  C1 `lost` live documents whose points are missing, incomplete, of other text or with a wrong
  vector; `stale` documents with a visible point of an older version; C2 `resurrected` deleted
  documents with a visible point; C3/C4 the ledger against the emulator's bill.

The table comes first; the last line is one JSON object (`ok` needs zero lost, stale, resurrected,
good documents dead and unaccounted tokens; `poison_published` and `poison_rejected` count the
malformed messages and the rejections they left). With --keep the temp dir (worker log, Redis
AOF, Qdrant files) stays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    EmulatorProcess,
    clean_env,
    free_port,
    stop_process,
    temp_database,
    wait_for,
)
from worker.events import MAX_VERSION

COLLECTION = "chaos"
MODEL = "text-embedding-v4"
DIMENSIONS = 256
CHUNK_MAX_TOKENS = 200
CHUNK_OVERLAP_TOKENS = 32
MAX_ROWS = 10  # rows per request of the model
RECONCILE_INTERVAL_S = 5.0
LEASE_S = 10.0
REQUEST_TIMEOUT_S = 5.0
VISIBILITY_TIMEOUT_S = 20.0
BATCH_EVENTS = 20
QUEUE = "celery"
EXTRA_CALLS_DEFINITION = "bill requests - ceil(distinct chunk texts embedded / 10 rows per request)"

WORDS = (
    "order shipping refund invoice account password delivery warehouse parcel courier address "
    "payment card bank transfer coupon discount return policy warranty repair battery screen "
    "keyboard laptop phone tablet charger cable adapter storage memory update firmware support "
    "ticket agent hours weekend holiday express standard tracking number customs duty tax region "
    "language currency euro yuan dollar price list catalog stock size colour model series"
).split()


# --- the events and the model (pure) --------------------------------------------------------


def _text(rng: random.Random, doc_id: str, version: int) -> str:
    """Sentences of random words; one in five is long enough for 2-3 chunks of 200 tokens."""
    words = rng.randint(250, 420) if rng.random() < 0.2 else rng.randint(15, 110)
    out, sentence = [f"{doc_id} v{version}."], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 14):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def make_events(n_events: int, n_docs: int, seed: int) -> list[dict[str, Any]]:
    """Seeded events over `n_docs` documents: new versions (55 %), deletes (10 %), exact
    duplicates of earlier events (20 %) and reordered versions (15 %: a version below the highest
    one sent, never sent before). New versions step by 2-4, leaving gaps for reordering."""
    rng = random.Random(seed)
    doc_ids = [f"doc-{i:05d}" for i in range(n_docs)]
    highest: dict[str, int] = {}
    used: dict[str, set[int]] = {d: set() for d in doc_ids}
    events: list[dict[str, Any]] = []

    def new(doc_id: str, version: int, op: str) -> dict[str, Any]:
        event: dict[str, Any] = {"op": op, "doc_id": doc_id, "collection": COLLECTION, "version": version}
        if op == "upsert":
            event["text"] = _text(rng, doc_id, version)
        used[doc_id].add(version)
        return event

    while len(events) < n_events:
        roll = rng.random()
        if roll < 0.20 and events:
            events.append(dict(rng.choice(events)))  # an exact duplicate
            continue
        if roll < 0.35 and highest:
            doc_id = rng.choice(list(highest))
            gaps = [v for v in range(1, highest[doc_id]) if v not in used[doc_id]]
            if gaps:  # an older version, sent after a newer one
                events.append(new(doc_id, rng.choice(gaps), "upsert"))
                continue
        doc_id = rng.choice(doc_ids)
        version = highest.get(doc_id, 0) + rng.randint(2, 4)
        op = "delete" if roll > 0.90 and doc_id in highest else "upsert"
        highest[doc_id] = version
        events.append(new(doc_id, version, op))
    return events


def final_state(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The model: per doc_id, the event of the highest version sent (versions never repeat with
    different content, so ties are exact duplicates)."""
    model: dict[str, dict[str, Any]] = {}
    for event in events:
        current = model.get(event["doc_id"])
        if current is None or event["version"] > current["version"]:
            model[event["doc_id"]] = event
    return model


def messages(events: list[dict[str, Any]], seed: int) -> list[tuple[str, Any]]:
    """Broker messages in event order: mostly `ingest_many` of 1-BATCH_EVENTS events, one in ten a
    single `ingest`."""
    rng = random.Random(seed + 1)
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(events):
        if rng.random() < 0.1:
            out.append(("sidecar.ingest", events[i]))
            i += 1
        else:
            n = rng.randint(BATCH_EVENTS // 2, BATCH_EVENTS)
            out.append(("sidecar.ingest_many", events[i : i + n]))
            i += n
    return out


# Malformed messages, in this order over the poison share (every kind appears once the share
# holds eight messages): two raw entries that are not Celery messages, events with a lone
# surrogate, NUL or a trailing newline in a field, a doc at the highest version then a version-less
# event for it, a proper event under a 100-character task id, and 200 levels of metadata.
POISON_KINDS = (
    "foreign_json",
    "undecodable_bytes",
    "surrogate_doc_id",
    "nul_text",
    "newline_collection",
    "max_version_then_none",
    "long_task_id",
    "deep_metadata",
)
# Kinds the event contract refuses outright: each leaves at least one `rejected_events` row.
MUST_REJECT = frozenset({"foreign_json", "undecodable_bytes", "surrogate_doc_id", "newline_collection"})
POISON_PREFIX = "poison-"  # doc ids of poison events: never in the model


@dataclass(frozen=True)
class Message:
    """One publish: a task and its argument, or `raw` bytes pushed onto the queue list as is."""

    task: str
    arg: Any = None
    task_id: str | None = None
    raw: bytes | None = None
    poison: str | None = None  # the POISON_KINDS entry, None for a good message


def poison_message(kind: str, n: int) -> Message:
    """The `n`-th poison message, of `kind`."""
    doc_id = f"{POISON_PREFIX}{n:05d}"
    event: dict[str, Any] = {"op": "upsert", "doc_id": doc_id, "collection": COLLECTION, "text": f"{doc_id}."}
    if kind == "foreign_json":
        return Message("raw", raw=b'{"hello": "world"}', poison=kind)
    if kind == "undecodable_bytes":
        return Message("raw", raw=b"\xff\xfe\x00garbage", poison=kind)
    if kind == "surrogate_doc_id":
        event["doc_id"] = doc_id + "\ud800"  # Celery's JSON keeps ensure_ascii: sent as an escape
    elif kind == "nul_text":
        event["text"] = "nul \x00 inside"
    elif kind == "newline_collection":
        event["collection"] = COLLECTION + "\n"
    elif kind == "max_version_then_none":
        top = {**event, "version": MAX_VERSION}
        return Message("sidecar.ingest_many", [top, event], poison=kind)
    elif kind == "long_task_id":
        return Message("sidecar.ingest", event, task_id="t" * 100 + f"-{n}", poison=kind)
    elif kind == "deep_metadata":
        meta: dict[str, Any] = {"leaf": n}
        for _ in range(200):
            meta = {"k": meta}
        event["metadata"] = meta
    else:
        raise ValueError(f"unknown poison kind {kind!r}")
    return Message("sidecar.ingest", event, poison=kind)


def with_poison(sends: list[tuple[str, Any]], share: float, seed: int) -> list[Message]:
    """`sends` with poison messages at seeded places, so that they are `share` of all messages."""
    out = [Message(task, arg) for task, arg in sends]
    if share <= 0:
        return out
    n_poison = max(1, round(len(sends) * share / (1 - share)))
    rng = random.Random(seed + 2)
    for n in range(n_poison):
        out.insert(rng.randint(0, len(out)), poison_message(POISON_KINDS[n % len(POISON_KINDS)], n))
    return out


def publisher_poison(sends: list[Message]) -> int:
    return sum(m.poison is not None for m in sends)


def min_rejections(sends: list[Message]) -> int:
    """Rejections the poison messages must leave at the least (one per refused kind)."""
    return sum(m.poison in MUST_REJECT for m in sends)


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    resurrected: list[str] = field(default_factory=list)
    wrong_vectors: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # doc_id -> why it is lost


def check_points(
    model: dict[str, dict[str, Any]], points: list[dict[str, Any]], expected_chunks: Any, vector_ok: Any
) -> Verdict:
    """C1/C2 over the store's points (dicts with payload and vector), against the model.

    `expected_chunks(text)` gives the chunks (index, text, content_hash) the worker must hold;
    `vector_ok(text, vector)` says whether a stored vector is the provider's vector of that text.
    """
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        payload = point["payload"]
        if payload.get("deleted"):
            continue  # a tombstone: no vector, never visible
        by_doc.setdefault(payload["doc_id"], []).append(point)
    verdict = Verdict()
    for doc_id, event in sorted(model.items()):
        visible = by_doc.get(doc_id, [])
        if event["op"] == "delete":
            if visible:
                verdict.resurrected.append(doc_id)
            continue
        if any(p["payload"]["version"] < event["version"] for p in visible):
            verdict.stale.append(doc_id)
        chunks = expected_chunks(event["text"])
        got = {p["payload"]["chunk_index"]: p for p in visible}
        why = None
        if not visible:
            why = "no points"
        elif sorted(got) != list(range(len(chunks))) or len(visible) != len(chunks):
            why = f"chunk indexes {sorted(got)} != 0..{len(chunks) - 1}"
        else:
            for chunk in chunks:
                payload = got[chunk.index]["payload"]
                if payload["version"] != event["version"]:
                    why = f"chunk {chunk.index} at version {payload['version']} != {event['version']}"
                elif payload.get("chunk_count") != len(chunks):
                    why = f"chunk {chunk.index} chunk_count {payload.get('chunk_count')} != {len(chunks)}"
                elif payload.get("content_hash") != chunk.content_hash or payload.get("text") != chunk.text:
                    why = f"chunk {chunk.index} holds other text"
                elif not vector_ok(chunk.text, got[chunk.index]["vector"]):
                    why = f"chunk {chunk.index} has a wrong vector"
                    verdict.wrong_vectors += 1
                if why:
                    break
        if why:
            verdict.lost.append(doc_id)
            verdict.reasons[doc_id] = why
    return verdict


# --- services at the edges ------------------------------------------------------------------


class RedisServer:
    """Our own redis-server (AOF, fsync always) on a loopback port; restartable on the same dir."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.start()

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)]
        argv += ["--maxmemory-policy", "noeviction"]
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(
            self.ping,
            timeout_s=20,
            what=f"redis-server on port {self.port}",
            procs=[(self.proc, self.dir / "redis.log")],
        )

    def ping(self) -> bool:
        import redis

        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # writes and fsyncs the AOF, then exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, outage_s: float) -> None:
        self.stop()
        time.sleep(outage_s)  # the outage itself is the fault being injected
        self.start()
        self.restarts += 1

    def queue_state(self) -> tuple[int, int]:
        """(messages waiting in the queue, messages delivered but not acknowledged)."""
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return int(client.llen(QUEUE)), int(client.hlen("unacked"))
        except redis.RedisError:
            return -1, -1
        finally:
            client.close()

    def unacked_messages(self) -> list[dict[str, Any]]:
        """Bodies of messages still in kombu's `unacked` hash (delivered to a worker, never acked)."""
        import base64

        import redis

        client = redis.Redis.from_url(self.url)
        try:
            out = []
            for tag, raw in client.hgetall("unacked").items():
                try:
                    message = json.loads(raw)[0]  # [message, exchange, routing key]
                    body = message["body"]
                    if message.get("properties", {}).get("body_encoding") == "base64":
                        body = base64.b64decode(body)
                    args = json.loads(body)[0][0]  # body: [args, kwargs, embed]; args: [events]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    out.append({"delivery_tag": tag.decode(), "error": repr(exc)})
                    continue
                headers = message.get("headers", {})
                out.append(
                    {
                        "delivery_tag": tag.decode(),
                        "task": headers.get("task"),
                        "task_id": headers.get("id"),
                        "args": args,
                    }
                )
            return out
        finally:
            client.close()


class Worker:
    """`sidecar worker` restarted after each SIGKILL; every incarnation logs to one file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.started_at = 0.0
        self.ready_at: float | None = None
        self._offset = 0
        self.crashes = 0  # exits we did not cause

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"=== chaos: worker start {self.starts + 1} at {time.time():.3f} ===\n".encode())
            log.flush()
            self._offset = log.tell()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "api.cli",
                    "worker",
                    "--pool",
                    "threads",
                    "--embed-threads",
                    "2",
                    "--loglevel",
                    "INFO",
                ],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        self.started_at = time.monotonic()
        self.ready_at: float | None = None

    def ready(self) -> bool:
        """True once this incarnation runs its embedding loops (its log says `embed.started`)."""
        if self.ready_at is None:
            with open(self.log_path, "rb") as log:
                log.seek(self._offset)
                if b"embed.started" in log.read():
                    self.ready_at = time.monotonic()
        return self.ready_at is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        with open(self.log_path, "ab") as log:
            log.write(f"=== chaos: SIGKILL at {time.time():.3f} ===\n".encode())

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=30)


class Publisher(threading.Thread):
    """Publishes every message, paced over `duration_s`; a failed publish is retried, never dropped."""

    def __init__(self, broker_url: str, sends: list[Message], duration_s: float) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        from worker.settings import Settings
        from worker.tasks import create_celery

        self.app = create_celery(Settings(broker_url=broker_url))
        self.broker_url = broker_url
        self.sends = sends
        self.duration_s = duration_s
        self.sent = 0
        self.poison_sent = 0
        self.retries = 0
        self.published: list[tuple[str, float]] = []  # (task id, time.monotonic()) per good message
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = time.monotonic()
            for i, message in enumerate(self.sends):
                due = start + self.duration_s * i / len(self.sends)
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)  # pacing: events arrive over the whole kill phase
                self._send(message)
                self.sent += 1
                self.poison_sent += message.poison is not None
        except BaseException as exc:
            self.error = exc

    def _send(self, message: Message) -> None:
        backoff_s = 0.2
        while True:
            try:
                if message.raw is not None:
                    self._push_raw(message.raw)
                    return
                result = self.app.send_task(
                    message.task,
                    args=[message.arg],
                    task_id=message.task_id,
                    retry=True,
                    retry_policy={
                        "max_retries": 2,
                        "interval_start": 0.1,
                        "interval_step": 0.2,
                        "interval_max": 0.5,
                    },
                )
                if message.poison is None:
                    self.published.append((result.id, time.monotonic()))
                return
            except Exception:  # the broker is down or restarting: try again, the event must get out
                self.retries += 1
                time.sleep(backoff_s)
                backoff_s = min(2.0, backoff_s * 2)

    def _push_raw(self, entry: bytes) -> None:
        """An entry put on the queue list the way kombu publishes (LPUSH), by a foreign producer."""
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            client.lpush(QUEUE, entry)
        finally:
            client.close()


# --- SQL reads ------------------------------------------------------------------------------


def sql_progress(engine: Any, model: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How far SQL is from the model: documents not yet at their model version, not finished."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select doc_id, version, op, status from documents where collection = :c"),
            {"c": COLLECTION},
        ).all()
        sent = conn.execute(
            sa.text("select count(*) from provider_requests where status = 'sent'")
        ).scalar_one()
    have = {r.doc_id: r for r in rows}
    behind = unfinished = 0
    for doc_id, event in model.items():
        row = have.get(doc_id)
        if row is None or row.version < event["version"]:
            behind += 1
        elif row.status == "pending":
            unfinished += 1
    return {
        "behind": behind,
        "unfinished": unfinished,
        "sent_rows": sent,
        "pending": sum(r.status == "pending" for r in rows),
    }


def read_ledger(engine: Any) -> dict[str, Any]:
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select id, provider_request_id, status, est_tokens, billed_tokens, rows "
                "from provider_requests"
            )
        ).all()
        cached = conn.execute(sa.text("select count(*) from embedding_cache")).scalar_one()
        docs = conn.execute(
            sa.text(
                "select doc_id, version, op, status, attempts, last_error "
                "from documents where collection = :c"
            ),
            {"c": COLLECTION},
        ).all()
        rejected = conn.execute(sa.text("select count(*) from rejected_events")).scalar_one()
    return {
        "requests": rows,
        "cached_texts": cached,
        "docs": {d.doc_id: d for d in docs},
        "rejected": rejected,
    }


def read_points(qdrant_path: Path) -> list[dict[str, Any]]:
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(qdrant_path))
    try:
        if not client.collection_exists(COLLECTION):
            return []
        points, offset = [], None
        while True:
            batch, offset = client.scroll(
                COLLECTION, limit=512, offset=offset, with_payload=True, with_vectors=True
            )
            for p in batch:
                vector = p.vector.get("dense") if isinstance(p.vector, dict) else p.vector
                points.append({"id": str(p.id), "payload": p.payload or {}, "vector": vector})
            if offset is None:
                return points
    finally:
        client.close()


# --- the run --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=5000, help="events to publish (default 5000)")
    p.add_argument("--docs", type=int, default=500, help="documents they touch (default 500)")
    p.add_argument("--seed", type=int, default=7, help="seed of events, kills and faults (default 7)")
    p.add_argument(
        "--kill-every-s",
        type=float,
        nargs=2,
        default=(2.0, 6.0),
        metavar=("MIN", "MAX"),
        help="SIGKILL the worker MIN-MAX s (uniform, seeded) after it is ready (default 2 6)",
    )
    p.add_argument(
        "--min-kills",
        type=int,
        default=20,
        help="kill at least this often, even when the backlog is empty (default 20)",
    )
    p.add_argument(
        "--publish-s",
        type=float,
        default=None,
        help="spread publishing over this long (default: 1.5 x --min-kills x the mean kill wait)",
    )
    p.add_argument("--error-rate", type=float, default=0.10, help="emulator 5xx share (default 0.10)")
    p.add_argument("--throttle-rate", type=float, default=0.05, help="emulator 429 share (default 0.05)")
    p.add_argument("--latency-ms", type=float, default=5.0, help="emulator latency (default 5)")
    p.add_argument("--no-redis-restart", action="store_true", help="do not restart Redis mid-run")
    p.add_argument(
        "--poison-share",
        type=float,
        default=0.02,
        help="share of published messages that are malformed, cycling through the poison kinds "
        "(default 0.02; 0 for none)",
    )
    p.add_argument(
        "--quiesce-timeout-s",
        type=float,
        default=150.0,
        help="give up waiting for quiescence after this long; the checker runs anyway "
        "(default 150: ledger rows of a killed call stay `sent` for 2 x request timeout + 60 s)",
    )
    p.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "SIDECAR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="server URL; a fresh database is created on it and dropped afterwards",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, AOF, Qdrant files)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lo, hi = args.kill_every_s
    publish_s = (
        args.publish_s if args.publish_s is not None else max(5.0, args.min_kills * (lo + hi) / 2 * 1.5)
    )
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-chaos-"))
    print(f"chaos: temp dir {tmp}", flush=True)
    try:
        with temp_database(args.postgres_url, prefix="chaos") as database_url:
            result = run(args, tmp, database_url, publish_s)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(render(result))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def run(args: argparse.Namespace, tmp: Path, database_url: str, publish_s: float) -> dict[str, Any]:
    from worker.sql import engines

    started = time.monotonic()
    rng = random.Random(args.seed)
    lo, hi = args.kill_every_s
    events = make_events(args.events, args.docs, args.seed)
    model = final_state(events)
    sends = with_poison(messages(events, args.seed), args.poison_share, args.seed)

    redis_server = RedisServer(tmp / "redis")
    emulator = EmulatorProcess(
        tmp / "emulator.log",
        error_rate=args.error_rate,
        throttle_rate=args.throttle_rate,
        latency_ms=args.latency_ms,
        seed=args.seed,
    )
    worker: Worker | None = None
    engine = engines.make_engine(database_url)
    try:
        env = clean_env(
            SIDECAR_DATA_DIR=str(tmp / "data"),
            SIDECAR_BROKER_URL=redis_server.url,
            SIDECAR_DATABASE_URL=database_url,
            SIDECAR_QDRANT_PATH=str(tmp / "qdrant"),
            DASHSCOPE_API_KEY="sk-emulator",
            SIDECAR_DASHSCOPE_URL=emulator.url,
            SIDECAR_EMBEDDING_MODEL=MODEL,
            SIDECAR_EMBEDDING_DIMENSIONS=str(DIMENSIONS),
            SIDECAR_DEFAULT_COLLECTION=COLLECTION,
            SIDECAR_CHUNK_MAX_TOKENS=str(CHUNK_MAX_TOKENS),
            SIDECAR_CHUNK_OVERLAP_TOKENS=str(CHUNK_OVERLAP_TOKENS),
            SIDECAR_RECONCILE_INTERVAL_S=str(RECONCILE_INTERVAL_S),
            SIDECAR_LEASE_S=str(LEASE_S),
            SIDECAR_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
            # A killed worker's unacked messages come back after this (ingest takes milliseconds).
            SIDECAR_BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
            SIDECAR_LOG_TASK_LINES="true",  # the per-task lines tell received from never received
        )
        migrated = subprocess.run(
            [sys.executable, "-m", "api.cli", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"sidecar migrate failed: {migrated.stderr[-2000:]}")

        worker = Worker(env, tmp / "worker.log")
        worker.start()
        publisher = Publisher(redis_server.url, sends, publish_s)
        publisher.start()
        print(
            f"chaos: {len(events)} events in {len(sends)} messages ({publisher_poison(sends)} poison) "
            f"over {publish_s:.0f}s; {len(model)} documents in the model",
            flush=True,
        )

        # Each incarnation runs `uptime_s` (2-6 s) after it is ready, then gets SIGKILL: counting
        # from readiness, not from the start, so that every kill lands on a worker doing work.
        kills, last_kill = 0, started
        kill_times: list[float] = []
        redis_restart_at: float | None = None
        uptime_s = rng.uniform(lo, hi)
        redis_at = None if args.no_redis_restart else time.monotonic() + publish_s * 0.4
        published_at: float | None = None
        kill_phase_end = float("inf")
        while True:
            now = time.monotonic()
            if published_at is None and not publisher.is_alive():
                if publisher.error is not None:
                    raise RuntimeError(f"publisher failed: {publisher.error!r}")
                published_at = now
                kill_phase_end = now + max(30.0, publish_s / 2)  # a cap: kills must end for quiescence
            if worker.exited():  # an exit we did not cause: note it and start again
                worker.crashes += 1
                worker.start()
            if redis_at is not None and now >= redis_at:
                redis_at = None
                print("chaos: restarting redis", flush=True)
                redis_restart_at = time.monotonic()
                redis_server.restart(outage_s=2.0)
            if now >= kill_phase_end:
                break
            if worker.ready() and now >= (worker.ready_at or now) + uptime_s:
                queued, _ = redis_server.queue_state()
                progress = sql_progress(engine, model)
                backlog = queued != 0 or progress["behind"] or progress["unfinished"]
                if published_at is not None and not backlog and kills >= args.min_kills:
                    break
                worker.kill()
                kills += 1
                last_kill = now
                kill_times.append(now)
                worker.start()
                uptime_s = rng.uniform(lo, hi)
                if kills % 5 == 0:
                    print(
                        f"chaos: {kills} kills, {publisher.sent}/{len(sends)} messages published, "
                        f"{progress['behind']} docs behind, {progress['unfinished']} unfinished",
                        flush=True,
                    )
            time.sleep(0.05)
        kill_phase_s = time.monotonic() - started
        print(f"chaos: kills over after {kills} kills; waiting for quiescence", flush=True)

        quiesce = wait_quiescent(engine, model, redis_server, worker, args.quiesce_timeout_s)
        unacked = redis_server.unacked_messages()
        worker.stop()
        bill = emulator.client.get("/_emulator/bill").raise_for_status().json()
        ledger = read_ledger(engine)
        # Then the audit a user runs: `sidecar bill` matches unknown-outcome rows to the bill.
        from worker.ledger import billing

        with engines.make_sessionmaker(engine)() as session, session.begin():
            billing.reconcile(session, bill["requests"], apply=True)
        with engines.make_sessionmaker(engine)() as session:
            audit = billing.reconcile(session, bill["requests"])
        points = read_points(tmp / "qdrant")
    finally:
        if worker is not None:
            worker.stop()
        emulator.stop()
        redis_server.stop()
        engine.dispose()
    result = judge(model, events, points, ledger, bill, unacked)
    result.update(poison_published=publisher.poison_sent, poison_min_rejections=min_rejections(sends))
    result.update(
        deliveries(tmp / "worker.log", publisher.published, unacked, kill_times, redis_restart_at, started)
    )
    result.update(
        bill_reconciled=audit.balanced,
        ledger_tokens_after_bill=audit.ledger_tokens,
        bill_ids_in_ledger_after_bill=audit.matched_by_id,
        kills=kills,
        redis_restarts=redis_server.restarts,
        worker_crashes=worker.crashes,
        publish_retries=publisher.retries,
        messages=len(sends) - publisher_poison(sends),
        quiesced=quiesce["quiesced"],
        quiesce_waiting_for=quiesce["waiting_for"],
        kill_phase_s=round(kill_phase_s, 1),
        duration_s=round(time.monotonic() - started, 1),
        seed=args.seed,
        last_kill_s=round(last_kill - started, 1),
        temp_dir=str(tmp) if args.keep else None,
    )
    return result


def wait_quiescent(
    engine: Any, model: dict[str, dict[str, Any]], redis_server: RedisServer, worker: Worker, timeout_s: float
) -> dict[str, Any]:
    """Poll until SQL holds the model, no ledger row is `sent`, the queue is empty and the
    reconciler had two rounds since the last restart; gives up after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    waiting: list[str] = []
    while time.monotonic() < deadline:
        if worker.exited():
            worker.crashes += 1
            worker.start()
        progress = sql_progress(engine, model)
        queued, _ = redis_server.queue_state()
        waiting = [
            name
            for name, busy in (
                ("documents behind the model", progress["behind"]),
                ("documents pending", progress["unfinished"]),
                ("ledger rows sent", progress["sent_rows"]),
                ("broker queue", queued),
                (
                    "reconciler rounds",
                    not worker.ready()
                    or time.monotonic() - (worker.ready_at or 0.0) < 2 * RECONCILE_INTERVAL_S + 1,
                ),
            )
            if busy
        ]
        if not waiting:
            return {"quiesced": True, "waiting_for": []}
        time.sleep(0.5)
    progress = sql_progress(engine, model)
    return {"quiesced": False, "waiting_for": waiting, **progress}


def judge(
    model: dict[str, dict[str, Any]],
    events: list[dict[str, Any]],
    points: list[dict[str, Any]],
    ledger: dict[str, Any],
    bill: dict[str, Any],
    unacked: list[dict[str, Any]],
) -> dict[str, Any]:
    import numpy as np

    from api.emulator import expected_vector
    from worker import chunking

    def expected_chunks(text: str) -> list[chunking.Chunk]:
        return chunking.split_text(text, max_tokens=CHUNK_MAX_TOKENS, overlap_tokens=CHUNK_OVERLAP_TOKENS)

    def vector_ok(text: str, vector: list[float] | None) -> bool:
        if vector is None or len(vector) != DIMENSIONS:
            return False
        want = np.asarray(expected_vector(MODEL, DIMENSIONS, text))
        return bool(np.allclose(np.asarray(vector), want, atol=1e-5))

    verdict = check_points(model, points, expected_chunks, vector_ok)
    docs = ledger["docs"]
    dead = sorted(d for d, row in docs.items() if row.status == "dead")
    good_dead = [d for d in dead if d in model]
    # Documents SQL never heard of at their model version: events stranded in the broker.
    behind = sorted(d for d, e in model.items() if d not in docs or docs[d].version < e["version"])

    requests = ledger["requests"]
    by_status = Counter(r.status for r in requests)
    ledger_tokens = sum(r.billed_tokens or 0 for r in requests if r.status in ("succeeded", "unknown"))
    unknown_estimates = sum(r.billed_tokens or 0 for r in requests if r.status == "unknown")
    succeeded = {r.provider_request_id: r for r in requests if r.status == "succeeded"}
    bill_rows = bill["requests"]
    unmatched = [b for b in bill_rows if b["request_id"] not in succeeded]
    mismatched = sum(
        1
        for b in bill_rows
        if b["request_id"] in succeeded and succeeded[b["request_id"]].billed_tokens != b["tokens"]
    )
    not_on_bill = sum(1 for rid in succeeded if rid not in {b["request_id"] for b in bill_rows})
    bill_tokens = int(bill["total_tokens"])
    minimum = math.ceil(ledger["cached_texts"] / MAX_ROWS)
    unacked_events = [
        e
        for m in unacked
        for e in (m.get("args") if isinstance(m.get("args"), list) else [m.get("args")])
        if isinstance(e, dict)
    ]
    unacked_docs = sorted({e["doc_id"] for e in unacked_events})
    # Failing documents whose model event still sits in a message delivered to a killed worker.
    failing = set(verdict.lost) | set(verdict.stale) | set(verdict.resurrected)
    stranded = sorted(
        d
        for d in failing
        if any(e.get("doc_id") == d and e.get("version") == model[d]["version"] for e in unacked_events)
    )

    result: dict[str, Any] = {
        "ok": False,
        "events": len(events),
        "documents": len(model),
        "live_documents": sum(e["op"] == "upsert" for e in model.values()),
        "lost": len(verdict.lost),
        "stale": len(verdict.stale),
        "resurrected": len(verdict.resurrected),
        "wrong_vectors": verdict.wrong_vectors,
        "dead_letters": len(dead),
        "good_dead": len(good_dead),
        "sql_behind_model": len(behind),
        "broker_unacked_messages": len(unacked),
        "broker_unacked_docs": len(unacked_docs),
        "failing_docs_stranded_in_broker": len(stranded),
        "rejected_events": ledger["rejected"],
        "poison_rejected": ledger["rejected"],  # good events are all valid: every row is poison
        "points": len(points),
        "ledger_tokens": ledger_tokens,
        "bill_tokens": bill_tokens,
        "unaccounted_tokens": max(0, bill_tokens - ledger_tokens),
        "ledger_rows": dict(sorted(by_status.items())),
        "unknown_estimate_tokens": unknown_estimates,
        "bill_requests": len(bill_rows),
        "bill_ids_in_ledger": len(bill_rows) - len(unmatched),
        "bill_ids_not_in_ledger": len(unmatched),
        "bill_tokens_not_in_ledger": sum(b["tokens"] for b in unmatched),
        "ledger_bill_token_mismatches": mismatched,
        "succeeded_not_on_bill": not_on_bill,
        "distinct_texts_embedded": ledger["cached_texts"],
        "extra_provider_calls": len(bill_rows) - minimum,
        "extra_provider_calls_definition": EXTRA_CALLS_DEFINITION,
        "examples": {
            "lost": {d: verdict.reasons[d] for d in verdict.lost[:5]},
            "stale": verdict.stale[:5],
            "resurrected": verdict.resurrected[:5],
            "dead": {d: (docs[d].last_error or "")[:200] for d in dead[:5]},
            "behind": {
                d: {
                    "model_version": model[d]["version"],
                    "sql_version": docs[d].version if d in docs else None,
                }
                for d in behind[:5]
            },
            "unacked_docs": unacked_docs[:5],
            "stranded": stranded[:10],
        },
    }
    result["ok"] = not (
        verdict.lost or verdict.stale or verdict.resurrected or good_dead or result["unaccounted_tokens"]
    )
    return result


def deliveries(
    log_path: Path,
    published: list[tuple[str, float]],
    unacked: list[dict[str, Any]],
    kill_times: list[float],
    redis_restart_at: float | None,
    started: float,
) -> dict[str, Any]:
    """Which published messages a worker never logged as received (gone from the broker), and
    which it received but never finished (they sit in kombu's `unacked` hash), with their publish
    time next to the nearest kill and the Redis restart (seconds since the start)."""
    import re

    text = log_path.read_text("utf-8", errors="replace")
    received = set(re.findall(r"Task sidecar\.ingest\w*\[([0-9a-f-]+)\] received", text))
    finished = set(re.findall(r"Task sidecar\.ingest\w*\[([0-9a-f-]+)\] succeeded", text))
    in_unacked = {m.get("task_id") for m in unacked}

    def when(at: float) -> dict[str, Any]:
        nearest = min(kill_times, key=lambda k: abs(k - at), default=None)
        return {
            "published_s": round(at - started, 2),
            "nearest_kill_s": None if nearest is None else round(nearest - started, 2),
            "redis_restart_s": None if redis_restart_at is None else round(redis_restart_at - started, 2),
        }

    never = [(tid, at) for tid, at in published if tid not in received]
    unfinished = [tid for tid, _ in published if tid in received and tid not in finished]
    return {
        "messages_never_received": len(never),
        "messages_received_not_finished": len(unfinished),
        "messages_unfinished_in_unacked": sum(t in in_unacked for t in unfinished),
        "never_received": {tid: when(at) for tid, at in never[:10]},
    }


def render(r: dict[str, Any]) -> str:
    rows = [
        ("events / messages", f"{r['events']} / {r['messages']}"),
        ("documents (live)", f"{r['documents']} ({r['live_documents']})"),
        ("kills / redis restarts", f"{r['kills']} / {r['redis_restarts']}"),
        ("publish retries", r["publish_retries"]),
        ("quiesced", f"{r['quiesced']} {', '.join(r['quiesce_waiting_for'])}".strip()),
        ("lost", r["lost"]),
        ("stale", r["stale"]),
        ("resurrected", r["resurrected"]),
        ("wrong vectors", r["wrong_vectors"]),
        ("dead letters (good docs)", f"{r['dead_letters']} ({r['good_dead']})"),
        (
            "poison published / rejected",
            f"{r['poison_published']} / {r['poison_rejected']} (at least {r['poison_min_rejections']})",
        ),
        ("SQL behind model", r["sql_behind_model"]),
        ("broker unacked msgs / docs", f"{r['broker_unacked_messages']} / {r['broker_unacked_docs']}"),
        ("msgs never received", r["messages_never_received"]),
        (
            "msgs received, unfinished",
            f"{r['messages_received_not_finished']} ({r['messages_unfinished_in_unacked']} in unacked)",
        ),
        ("failing docs stranded", r["failing_docs_stranded_in_broker"]),
        ("ledger rows", " ".join(f"{k}={v}" for k, v in r["ledger_rows"].items())),
        ("ledger tokens", r["ledger_tokens"]),
        ("bill tokens", r["bill_tokens"]),
        ("unaccounted tokens", r["unaccounted_tokens"]),
        ("unknown-row estimates", r["unknown_estimate_tokens"]),
        (
            "bill ids in ledger",
            f"{r['bill_ids_in_ledger']}/{r['bill_requests']} ({r['bill_tokens_not_in_ledger']} tokens not)",
        ),
        (
            "after `sidecar bill`",
            f"balanced={r['bill_reconciled']} ledger tokens {r['ledger_tokens_after_bill']}, "
            f"bill ids in ledger {r['bill_ids_in_ledger_after_bill']}/{r['bill_requests']}",
        ),
        ("extra provider calls", r["extra_provider_calls"]),
        ("duration", f"{r['duration_s']}s"),
        ("ok", r["ok"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for kind, example in r["examples"].items():
        if example:
            lines.append(f"{kind}: {json.dumps(example)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
