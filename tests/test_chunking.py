"""split_text and the bundled sample set: tables, properties and a 1 MiB run."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import tokens
from worker.chunking import Chunk, content_hash, default_max_tokens, split_text, token_limit

WORDS = ["alpha", "beta", "vector", "ñandú", "Straße", "数据", "检索。", "end.", "why?", "\n", "\n\n"]
texty = st.lists(st.sampled_from(WORDS), max_size=300).map(" ".join) | st.text(max_size=400)


def assert_covers(text: str, chunks: list[Chunk]) -> None:
    """With no overlap: text == ws + chunk0 + ws + chunk1 + ... + ws, every ws whitespace-only."""
    text = tokens.normalize(text)
    pos = 0
    for chunk in chunks:
        gap = re.compile(r"\s*").match(text, pos).end()
        assert text.startswith(chunk.text, gap), (pos, chunk)
        pos = gap + len(chunk.text)
    assert not text[pos:].strip()


def assert_well_formed(chunks: list[Chunk], max_tokens: int) -> None:
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.text.strip() == chunk.text != ""
        assert chunk.tokens == tokens.count_tokens(chunk.text) <= max_tokens
        assert chunk.content_hash == content_hash(chunk.text)


@pytest.mark.parametrize(
    ("text", "max_tokens", "expected"),
    [
        ("", 16, []),
        (" \n\t\u3000 ", 16, []),
        ("  Hello world.  ", 16, ["Hello world."]),
        (
            "One two three four five six.\n\nSeven eight nine ten.",
            10,
            ["One two three four five six.", "Seven eight nine ten."],
        ),  # paragraph
        (
            "Hello. This one: here is more\ntext. And then a paragraph.\n\nNext part begins now",
            12,
            ["Hello. This one: here is more", "text. And then a paragraph.\n\nNext part begins now"],
        ),
        (
            "First line of text here\nsecond line goes on and on",
            8,
            ["First line of text here", "second line goes on and on"],
        ),  # line
        ("今天天气很好。我们去公园散步吧！", 8, ["今天天气很好。", "我们去公园散步吧！"]),  # CJK sentence
        (
            "It rains. The sun is out again and again",
            8,
            ["It rains. The sun is out again", "and again"],
        ),  # "." is in the window's first half
        (
            "Sí. ¿Dónde está la estación? Allí, al final de la calle.",
            10,
            ["Sí. ¿Dónde está la", "estación? Allí, al final de la", "calle."],
        ),  # whitespace
    ],
)
def test_split_text_table(text: str, max_tokens: int, expected: list[str]) -> None:
    chunks = split_text(text, max_tokens=max_tokens)
    assert [c.text for c in chunks] == expected
    assert_well_formed(chunks, max_tokens)


def test_nfc_and_hash() -> None:
    [chunk] = split_text("cafe\u0301", max_tokens=16)
    assert chunk.text == "café" and chunk.content_hash == content_hash("café")
    assert len(chunk.content_hash) == 64


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 10, "overlap_tokens": 5}, "overlap_tokens"),
        ({"max_tokens": 10, "overlap_tokens": -1}, "overlap_tokens"),
        ({"max_tokens": 3}, "max_tokens"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        split_text("some text", **kwargs)


@pytest.mark.parametrize(("limit", "expected"), [(8192, 8128), (2048, 2008), (100, 98)])
def test_default_max_tokens(limit: int, expected: int) -> None:
    assert default_max_tokens(limit) == expected


@pytest.mark.parametrize(
    ("configured", "row_limit", "expected"),
    [(None, 8192, 8128), (None, 2048, 2008), (500, 8192, 500), (9000, 8192, 8192), (0, 100, 98)],
)
def test_token_limit(configured: int | None, row_limit: int, expected: int) -> None:
    assert token_limit(configured, row_limit) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texty, max_tokens=st.integers(4, 64))
def test_chunks_fit_and_cover_text(text: str, max_tokens: int) -> None:
    chunks = split_text(text, max_tokens=max_tokens)
    assert_well_formed(chunks, max_tokens)
    assert_covers(text, chunks)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texty, max_tokens=st.integers(8, 64), data=st.data())
def test_overlapping_chunks_fit_and_advance(text: str, max_tokens: int, data) -> None:
    overlap = data.draw(st.integers(0, (max_tokens - 1) // 2))
    chunks = split_text(text, max_tokens=max_tokens, overlap_tokens=overlap)
    assert_well_formed(chunks, max_tokens)
    normalized = tokens.normalize(text)
    at = -1
    for chunk in chunks:  # each chunk is a slice further on than the one before
        at = normalized.find(chunk.text, at + 1)
        assert at >= 0
    if normalized.strip():
        assert normalized.strip().endswith(chunks[-1].text)


@pytest.mark.parametrize(
    ("text", "max_tokens"),
    [
        ("向量数据库存储文本的嵌入表示" * 400, 50),  # CJK without punctuation or spaces
        ("中文句子。" * 500 + "没有空格的很长的段落" * 100, 64),
        ("x" * 20_000, 32),  # no spaces at all
        ("🙂é𝔘ß" * 2_000, 4),  # multi-byte characters whose tokens split inside characters
    ],
)
def test_text_without_spaces(text: str, max_tokens: int) -> None:
    chunks = split_text(text, max_tokens=max_tokens)
    assert len(chunks) > 1
    assert_well_formed(chunks, max_tokens)
    assert "".join(c.text for c in chunks) == tokens.normalize(text)


def test_cjk_cuts_at_sentence_ends() -> None:
    text = "".join(f"第{i}句话讲的是向量检索和文本切分的细节。" for i in range(200))
    chunks = split_text(text, max_tokens=100)
    assert all(c.text.endswith("。") for c in chunks)


def test_overlap_repeats_about_overlap_tokens() -> None:
    text = " ".join(f"word{i}" for i in range(3000))
    chunks = split_text(text, max_tokens=200, overlap_tokens=40)
    for left, right in itertools.pairwise(chunks):
        first_word = right.text.split()[0]
        shared = left.text[left.text.rindex(" " + first_word) + 1 :]
        assert right.text.startswith(shared)
        assert 25 <= tokens.count_tokens(shared) <= 55


def test_one_mebibyte_document() -> None:
    paragraph = " ".join(["Vector search keeps an index of embeddings fresh as documents change."] * 12)
    text = ("\n\n".join([paragraph] * 2_000))[: 1 << 20]
    tokens.encoding()  # load the BPE outside the measured part
    started = time.perf_counter()
    chunks = split_text(text, max_tokens=default_max_tokens(8192), overlap_tokens=200)
    elapsed = time.perf_counter() - started
    assert_well_formed(chunks, default_max_tokens(8192))
    assert len(chunks) > 20
    assert elapsed < 10  # a hang guard; bench figures are printed elsewhere (about 0.15 s)


def load_sample() -> list[dict]:
    data = resources.files("worker").joinpath("data/sample_events.jsonl").read_text("utf-8")
    return [json.loads(line) for line in data.splitlines()]


def test_sample_set_follows_event_contract() -> None:
    events = load_sample()
    for event in events:
        assert event["op"] in ("upsert", "delete")
        assert 1 <= len(event["doc_id"]) <= 512
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", event["collection"])
        assert isinstance(event["version"], int) and event["version"] >= 0
        if event["op"] == "upsert":
            assert event["text"].strip() and isinstance(event["metadata"], dict)
            assert len(event["text"].encode()) <= 1 << 20
    upserts = [e for e in events if e["op"] == "upsert"]
    first = {e["doc_id"]: e for e in upserts if e["version"] == 1}
    assert len(upserts) >= 250
    assert len(Counter(e["metadata"]["lang"] for e in first.values())) >= 3
    assert 20 <= sum(1 for e in upserts if e["version"] > 1) <= 40
    assert 10 <= sum(1 for e in events if e["op"] == "delete") <= 20
    long = [e for e in first.values() if tokens.count_tokens(e["text"]) > 8192]
    assert len(long) >= 5
    for event in long:
        assert len(split_text(event["text"], max_tokens=default_max_tokens(8192))) >= 2
