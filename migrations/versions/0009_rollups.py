"""console and metrics: roll-ups instead of ledger scans (issue 13)

Revision ID: 0009
Revises: 0008

Two roll-ups of `provider_requests`, filled from the existing rows here and kept exact from then
on by triggers: every insert adds the row's contribution, every update subtracts the old one and
adds the new one, every delete subtracts it, in the transaction that changes the row.

- `provider_request_totals`: by (model, lane, status, HTTP status, latency bucket), for
  `/metrics`: a few hundred rows whatever the size of the ledger;
- `provider_request_hourly`: by (UTC hour of `created_at`, model, lane, status), for spend in a
  time window (the budget's overall caps, spend by day) in O(hours).

On SQLite (one writer at a time) the triggers add to the roll-ups directly. On PostgreSQL they
append the changes to `provider_request_deltas` instead: adding to a roll-up row locks it until
commit, and every ledger write adding to the same few rows would queue the workers behind each
other (measured: 8 threads writing the ledger fell from ~300 to ~100 requests/s). Readers add
the pending deltas to the roll-ups (worker/ledger/rollups.py), and `fold` moves them in.

A later migration that rebuilds `provider_requests` on SQLite (batch mode "move and copy") drops
these triggers: it must call `create_triggers` of this module again (tests/test_metrics.py checks
the roll-ups against a ledger scan at the head revision).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TOTALS = "provider_request_totals"
TOTALS_KEY = ("model", "lane", "status", "http_status", "latency_le")
HOURLY = "provider_request_hourly"
HOURLY_KEY = ("bucket", "model", "lane", "status")
DELTAS = "provider_request_deltas"
SUMS = ("requests", "rows", "est_tokens", "billed_tokens", "cost_nano_cny", "latency_ms_sum")
HOURLY_SUMS = SUMS[:-1]
# Histogram bounds (ms, label in seconds), as worker/ledger/rollups.py names them; frozen here.
LATENCY_BOUNDS = (
    ("50", "0.05"),
    ("100", "0.1"),
    ("250", "0.25"),
    ("500", "0.5"),
    ("1000", "1"),
    ("2500", "2.5"),
    ("5000", "5"),
    ("10000", "10"),
    ("30000", "30"),
    ("60000", "60"),
)
# Columns whose change moves a row's contribution (an UPDATE of others fires nothing).
WATCHED = (
    "created_at",
    "model",
    "lane",
    "status",
    "http_status",
    "latency_ms",
    "rows",
    "est_tokens",
    "billed_tokens",
    "cost_nano_cny",
)


def _hour(row: str, dialect: str) -> str:
    """The UTC hour of `created_at` as text, "2026-11-21T07" (worker/ledger/counters.py `hour_bucket`);
    SQLite holds it as text "2026-11-21 07:…" in UTC."""
    if dialect == "postgresql":
        return f"to_char({row}.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')"
    return f"substr({row}.created_at, 1, 10) || 'T' || substr({row}.created_at, 12, 2)"


def _columns(row: str, sign: str, dialect: str) -> dict[str, str]:
    """Every key and sum of one ledger row's contribution (negated with sign "-")."""
    cases = " ".join(f"WHEN {row}.latency_ms <= {ms} THEN '{le}'" for ms, le in LATENCY_BOUNDS)
    return {
        "bucket": _hour(row, dialect),
        "model": f"{row}.model",
        "lane": f"{row}.lane",
        "status": f"{row}.status",
        "http_status": f"COALESCE({row}.http_status, 0)",
        "latency_le": f"CASE WHEN {row}.latency_ms IS NULL THEN '' {cases} ELSE '+Inf' END",
        "requests": f"{sign}1",
        "rows": f"{sign}{row}.rows",
        "est_tokens": f"{sign}{row}.est_tokens",
        "billed_tokens": f"{sign}COALESCE({row}.billed_tokens, 0)",
        "cost_nano_cny": f"{sign}COALESCE({row}.cost_nano_cny, 0)",
        "latency_ms_sum": f"{sign}COALESCE({row}.latency_ms, 0)",
    }


def _upsert(table: str, key: tuple[str, ...], sums: tuple[str, ...], values: dict[str, str]) -> str:
    added = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in sums)
    return (
        f"INSERT INTO {table} ({', '.join(key + sums)}) VALUES ({', '.join(values[c] for c in key + sums)}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {added}"
    )


def _applied(row: str, sign: str, dialect: str) -> str:
    """The statements adding one row's contribution: to the deltas on PostgreSQL, else to both
    roll-ups (always in this order, so locks are taken in it)."""
    values = _columns(row, sign, dialect)
    if dialect == "postgresql":
        return f"INSERT INTO {DELTAS} ({', '.join(values)}) VALUES ({', '.join(values.values())})"
    return f"{_upsert(TOTALS, TOTALS_KEY, SUMS, values)}; {_upsert(HOURLY, HOURLY_KEY, HOURLY_SUMS, values)}"


def create_triggers(dialect: str) -> None:
    watched = ", ".join(WATCHED)
    if dialect == "postgresql":
        op.execute(
            f"""CREATE OR REPLACE FUNCTION {TOTALS}_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN {_applied("OLD", "-", dialect)}; END IF;
  IF TG_OP <> 'DELETE' THEN {_applied("NEW", "", dialect)}; END IF;
  RETURN NULL;
END $$"""
        )
        op.execute(
            f"CREATE TRIGGER {TOTALS}_sync AFTER INSERT OR DELETE OR UPDATE OF {watched} "
            f"ON provider_requests FOR EACH ROW EXECUTE FUNCTION {TOTALS}_apply()"
        )
        return
    new, old = _applied("NEW", "", dialect), _applied("OLD", "-", dialect)
    op.execute(f"CREATE TRIGGER {TOTALS}_insert AFTER INSERT ON provider_requests BEGIN {new}; END")
    op.execute(
        f"CREATE TRIGGER {TOTALS}_update AFTER UPDATE OF {watched} ON provider_requests "
        f"BEGIN {old}; {new}; END"
    )
    op.execute(f"CREATE TRIGGER {TOTALS}_delete AFTER DELETE ON provider_requests BEGIN {old}; END")


def drop_triggers(dialect: str) -> None:
    if dialect == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TOTALS}_sync ON provider_requests")
        op.execute(f"DROP FUNCTION IF EXISTS {TOTALS}_apply()")
        return
    for suffix in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS {TOTALS}_{suffix}")


def _sum_columns(with_latency: bool = True) -> list[sa.Column[int]]:
    columns = [sa.Column(c, sa.BigInteger(), nullable=False) for c in HOURLY_SUMS]
    return [*columns, sa.Column("latency_ms_sum", sa.Float(), nullable=False)] if with_latency else columns


def upgrade() -> None:
    key_columns = {
        "bucket": sa.String(length=13),
        "model": sa.String(length=64),
        "lane": sa.String(length=16),
        "status": sa.String(length=16),
        "http_status": sa.Integer(),
        "latency_le": sa.String(length=8),
    }
    op.create_table(
        TOTALS,
        *(sa.Column(c, key_columns[c], nullable=False) for c in TOTALS_KEY),
        *_sum_columns(),
        sa.PrimaryKeyConstraint(*TOTALS_KEY, name=op.f(f"pk_{TOTALS}")),
    )
    op.create_table(
        HOURLY,
        *(sa.Column(c, key_columns[c], nullable=False) for c in HOURLY_KEY),
        *_sum_columns(with_latency=False),
        sa.PrimaryKeyConstraint(*HOURLY_KEY, name=op.f(f"pk_{HOURLY}")),
    )
    op.create_table(
        DELTAS,
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        *(sa.Column(c, t, nullable=False) for c, t in key_columns.items()),
        *_sum_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{DELTAS}")),
    )
    dialect = op.get_bind().dialect.name
    # The triggers first: on PostgreSQL creating one locks out writers of the ledger until this
    # migration commits, so the rows summed below are all the rows there are.
    create_triggers(dialect)
    values = _columns("provider_requests", "", dialect)
    for table, key, sums in ((TOTALS, TOTALS_KEY, SUMS), (HOURLY, HOURLY_KEY, HOURLY_SUMS)):
        summed = ", ".join(f"SUM({values[c]})" if c != "requests" else "COUNT(*)" for c in sums)
        op.execute(
            f"INSERT INTO {table} ({', '.join(key + sums)}) "
            f"SELECT {', '.join(values[c] for c in key)}, {summed} FROM provider_requests "
            f"GROUP BY {', '.join(str(i + 1) for i in range(len(key)))}"
        )


def downgrade() -> None:
    drop_triggers(op.get_bind().dialect.name)
    op.drop_table(DELTAS)
    op.drop_table(HOURLY)
    op.drop_table(TOTALS)
