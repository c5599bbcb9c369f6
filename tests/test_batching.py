"""plan_batches and split_full, from tables."""

from __future__ import annotations

import pytest

from worker.batching import Row, plan_batches, split_full


def rows(*token_counts: int) -> list[Row]:
    return [Row(key=f"r{i}", text=f"text {i}", tokens=n) for i, n in enumerate(token_counts)]


def keys(batches: list[list[Row]]) -> list[list[str]]:
    return [[row.key for row in batch] for batch in batches]


@pytest.mark.parametrize(
    ("token_counts", "max_rows", "max_tokens_per_request", "expected"),
    [
        ((), 10, None, []),
        ((5,), 10, None, [["r0"]]),
        ((5,) * 10, 10, None, [[f"r{i}" for i in range(10)]]),
        ((5,) * 11, 10, None, [[f"r{i}" for i in range(10)], ["r10"]]),
        ((5,) * 5, 2, None, [["r0", "r1"], ["r2", "r3"], ["r4"]]),
        ((5,) * 3, 1, None, [["r0"], ["r1"], ["r2"]]),
        # a token budget per request closes a batch before it has max_rows rows
        ((6, 6, 6, 6), 10, 12, [["r0", "r1"], ["r2", "r3"]]),
        ((6, 7, 5, 1), 10, 12, [["r0"], ["r1", "r2"], ["r3"]]),
        ((12, 1, 11, 1), 10, 12, [["r0"], ["r1", "r2"], ["r3"]]),
        # input order is kept: no reordering to fill gaps
        ((10, 10, 2, 2), 10, 12, [["r0"], ["r1", "r2"], ["r3"]]),
    ],
)
def test_plan_batches(token_counts, max_rows, max_tokens_per_request, expected) -> None:
    batches = plan_batches(
        rows(*token_counts),
        max_rows=max_rows,
        max_tokens_per_row=100,
        max_tokens_per_request=max_tokens_per_request,
    )
    assert keys(batches) == expected


@pytest.mark.parametrize(
    ("row", "max_tokens_per_request", "message"),
    [
        (Row("doc-7#0", "big", 101), None, r"row 'doc-7#0'.*101 tokens.*max_tokens_per_row=100"),
        (Row("doc-7#1", "big", 60), 50, r"row 'doc-7#1'.*60 tokens.*max_tokens_per_request=50"),
        (Row("doc-7#2", "  \n", 1), None, r"row 'doc-7#2'.*empty"),
    ],
)
def test_plan_batches_rejects_rows(row: Row, max_tokens_per_request, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_batches(
            [*rows(1, 2), row],
            max_rows=10,
            max_tokens_per_row=100,
            max_tokens_per_request=max_tokens_per_request,
        )


def test_plan_batches_rejects_zero_rows() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        plan_batches(rows(1), max_rows=0, max_tokens_per_row=100)


@pytest.mark.parametrize(
    ("token_counts", "max_rows", "max_tokens_per_request", "full", "rest"),
    [
        ((), 3, None, [], []),
        ((1, 1), 3, None, [], ["r0", "r1"]),
        ((1, 1, 1), 3, None, [["r0", "r1", "r2"]], []),
        ((1,) * 7, 3, None, [["r0", "r1", "r2"], ["r3", "r4", "r5"]], ["r6"]),
        # closed by the token budget: sent although under max_rows
        ((8, 8, 1), 3, 10, [["r0"]], ["r1", "r2"]),
    ],
)
def test_split_full(token_counts, max_rows, max_tokens_per_request, full, rest) -> None:
    batches = plan_batches(
        rows(*token_counts),
        max_rows=max_rows,
        max_tokens_per_row=100,
        max_tokens_per_request=max_tokens_per_request,
    )
    sent, held = split_full(batches, max_rows)
    assert keys(sent) == full
    assert [row.key for row in held] == rest


def test_balanced_batches_keep_rows_and_even_out_tokens():
    tokens = [900, 10, 10, 800, 10, 10, 10, 700, 10, 10, 10, 10, 5, 5]
    rows = [Row(f"r{i}", "x", t) for i, t in enumerate(tokens)]
    plain = plan_batches(rows, max_rows=4, max_tokens_per_row=1000)
    balanced = plan_batches(rows, max_rows=4, max_tokens_per_row=1000, balance_tokens=True)
    assert [len(b) for b in balanced] == [4, 4, 4, 2]
    assert balanced[-1] == plain[-1]  # the partial batch is still the newest rows, in order
    assert sorted(r.key for b in balanced for r in b) == sorted(r.key for r in rows)
    weights = sorted(sum(r.tokens for r in b) for b in balanced[:-1])
    assert weights == [730, 830, 930]  # plain: 1720, 730, 40
