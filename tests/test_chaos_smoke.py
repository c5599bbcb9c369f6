"""The chaos run, short: kills, a Redis restart and provider faults, then the checker says ok.

The event generator and the checker are pure and checked from small tables; the run itself is a
subprocess on real PostgreSQL, its own redis-server, the emulator and the real worker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos import (
    MUST_REJECT,
    POISON_KINDS,
    check_points,
    final_state,
    make_events,
    messages,
    min_rejections,
    with_poison,
)
from tests.fixtures.services import missing_service
from worker import chunking

ROOT = Path(__file__).resolve().parents[1]


def test_events_hold_every_kind_and_the_model_keeps_the_highest_version():
    events = make_events(400, 40, seed=3)
    assert len(events) == 400
    keys = [json.dumps(e, sort_keys=True) for e in events]
    assert len(set(keys)) < len(keys)  # exact duplicates
    assert any(e["op"] == "delete" for e in events)
    highest: dict[str, int] = {}
    reordered = 0
    for e in events:
        reordered += e["version"] < highest.get(e["doc_id"], -1)
        highest[e["doc_id"]] = max(highest.get(e["doc_id"], -1), e["version"])
    assert reordered > 0
    model = final_state(events)
    assert {d: e["version"] for d, e in model.items()} == highest
    sent = [e for _, arg in messages(events, seed=3) for e in (arg if isinstance(arg, list) else [arg])]
    assert sent == events


def test_poison_is_its_share_of_messages_and_leaves_the_good_ones_in_order():
    sends = messages(make_events(400, 40, seed=3), seed=3)
    mixed = with_poison(sends, 0.2, seed=3)
    poison = [m for m in mixed if m.poison is not None]
    assert len(poison) / len(mixed) == pytest.approx(0.2, abs=0.02)
    assert {m.poison for m in poison} == set(POISON_KINDS)
    assert [(m.task, m.arg) for m in mixed if m.poison is None] == sends
    assert all(m.raw is not None for m in poison if m.task == "raw")
    assert min_rejections(mixed) == sum(m.poison in MUST_REJECT for m in poison) > 0
    assert with_poison(sends, 0.0, seed=3) == [m for m in mixed if m.poison is None]
    # Surrogates travel as JSON escapes, the way Celery's serializer sends them.
    surrogate = next(m for m in poison if m.poison == "surrogate_doc_id")
    assert "\\ud800" in json.dumps(surrogate.arg)


def _point(doc_id: str, version: int, chunk: chunking.Chunk, count: int) -> dict:
    payload = {
        "doc_id": doc_id,
        "version": version,
        "chunk_index": chunk.index,
        "chunk_count": count,
        "content_hash": chunk.content_hash,
        "text": chunk.text,
    }
    return {"payload": payload, "vector": [0.0]}


def _chunks(text: str) -> list[chunking.Chunk]:
    return chunking.split_text(text, max_tokens=8, overlap_tokens=0)


@pytest.mark.parametrize(
    ("stored", "lost", "stale", "resurrected"),
    [
        ("exact", 0, 0, 0),
        ("missing", 1, 0, 0),
        ("old version", 1, 1, 0),
        ("extra old chunk", 1, 1, 0),  # a shrink that left a chunk of the older version behind
        ("deleted but visible", 0, 0, 1),
    ],
)
def test_checker_classifies_points(stored, lost, stale, resurrected):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    model = {"a": {"op": "upsert", "version": 5, "text": text}, "b": {"op": "delete", "version": 4}}
    chunks = _chunks(text)
    points = [{"payload": {"doc_id": "b", "version": 4, "chunk_index": -1, "deleted": True}, "vector": None}]
    if stored != "missing":
        version = 3 if stored == "old version" else 5
        points += [_point("a", version, c, len(chunks)) for c in chunks]
    if stored == "extra old chunk":
        points.append(_point("a", 2, chunking.Chunk(len(chunks), "old", 1, "x"), len(chunks) + 1))
    if stored == "deleted but visible":
        points.append(_point("b", 3, chunks[0], 1))
    verdict = check_points(model, points, _chunks, lambda _text, _vector: True)
    assert (len(verdict.lost), len(verdict.stale), len(verdict.resurrected)) == (lost, stale, resurrected)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_chaos_run_is_ok(postgres_server_url):
    if shutil.which("redis-server") is None:
        missing_service(
            "redis-server (the chaos run starts and restarts its own)", FileNotFoundError("not on PATH")
        )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos",
            "--events",
            "300",
            "--docs",
            "60",
            "--seed",
            "11",
            "--kill-every-s",
            "1.5",
            "3",
            "--min-kills",
            "3",
            "--poison-share",
            "0.25",  # 8 of 32 messages: every poison kind once
            "--postgres-url",
            postgres_server_url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    result = json.loads(lines[-1])
    assert result["ok"], proc.stdout[-4000:]
    assert proc.returncode == 0
    assert result["kills"] >= 3
    assert result["redis_restarts"] == 1
    assert result["lost"] == result["stale"] == result["resurrected"] == result["unaccounted_tokens"] == 0
    assert result["quiesced"]
    assert result["good_dead"] == 0
    assert result["poison_published"] > 0
    assert result["poison_rejected"] >= result["poison_min_rejections"] > 0
