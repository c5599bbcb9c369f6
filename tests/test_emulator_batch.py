"""The emulator's Batch File API over real HTTP, through the official `openai` client unchanged."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from api.emulator import EmulatorConfig, config_from_args, expected_vector
from api.emulator.cli import add_parser

V4 = "text-embedding-v4"


def line(custom_id: str, text: str, model: str = V4, **extra) -> dict:
    body = {"model": model, "input": text, "dimensions": 64, "encoding_format": "float"}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body, **extra}


def jsonl(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(x) for x in lines).encode()


@pytest.fixture()
def client(emulator) -> openai.OpenAI:
    emulator.configure(batch_duration_s=0.3)
    return openai.OpenAI(
        api_key=emulator.api_key, base_url=f"{emulator.url}/compatible-mode/v1", max_retries=0
    )


def submit(client: openai.OpenAI, lines: list[dict], ds_name: str = "t"):
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"ds_name": ds_name},
    )


def wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)


def test_life_cycle_output_and_bill_through_the_openai_client(client, emulator):
    texts = ["the cat sat", "stock markets fell", "Café au lait ☕"]
    uploaded = client.files.create(
        file=("in.jsonl", jsonl([line(f"c{i}", t) for i, t in enumerate(texts)])), purpose="batch"
    )
    assert uploaded.id.startswith("file-batch-") and uploaded.purpose == "batch"
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert batch.status == "validating" and batch.request_counts.total == 3
    seen = {batch.status}
    while batch.status != "completed":
        time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
        seen.add(batch.status)
    assert {"in_progress", "completed"} <= seen
    assert batch.request_counts.completed == 3 and batch.error_file_id is None
    assert batch.in_progress_at <= batch.completed_at
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]
    for o, text in zip(out, texts, strict=True):
        assert o["response"]["status_code"] == 200 and o["error"] is None
        vector = o["response"]["body"]["data"][0]["embedding"]
        assert max(abs(a - b) for a, b in zip(vector, expected_vector(V4, 64, text), strict=True)) < 1e-6
    bill = emulator.bill()["requests"]
    assert [b["api"] for b in bill] == ["batch"] * 3 and {b["batch_id"] for b in bill} == {batch.id}
    assert {b["request_id"] for b in bill} == {o["response"]["request_id"] for o in out}
    usage = sum(o["response"]["body"]["usage"]["total_tokens"] for o in out)
    assert sum(b["tokens"] for b in bill) == usage
    assert bill[0]["cost_cny"] == f"{bill[0]['tokens'] * 0.00025 / 1000:.9f}"  # half the real-time price


def test_list_pages_after_a_cursor_and_filters_by_ds_name(client):
    ids = [submit(client, [line("a", "x")], ds_name=f"job{i}").id for i in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    everything = [b.id for b in client.batches.list(limit=2)]  # the client pages with `after`
    assert everything == ids[::-1]
    found = client.batches.list(limit=100, extra_query={"ds_name": "job3"}).data
    assert [b.id for b in found] == [ids[3]]
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)


def test_cancel_keeps_the_lines_done_so_far(client, emulator):
    emulator.configure(batch_duration_s=5.0)
    batch = submit(client, [line(f"c{i}", f"text {i}") for i in range(10)])
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.failed == 10
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([line("a", "x"), line("a", "y")], "duplicate_custom_id"),
        ([line("a", "x"), line("b", "y", model="text-embedding-v3")], "mismatched_model"),
        ([line("a", "x", model="no-such-model")], "model_not_found"),
        ([line("a", "x", url="/v1/chat/completions")], "invalid_url"),
        ([line(f"c{i}", "x") for i in range(4)], "too_many_requests"),
    ],
)
def test_an_input_file_that_breaks_a_rule_fails_the_job(client, emulator, lines, code):
    emulator.configure(batch_max_lines=3)
    batch = submit(client, lines)
    assert batch.status == "failed"
    assert code in {e.code for e in batch.errors.data}
    assert emulator.bill()["requests"] == []


def test_request_errors(client, emulator):
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", b"{}"), purpose="fine-tune")
    uploaded = client.files.create(file=("in.jsonl", jsonl([line("a", "x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="2h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-batch-nope", endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.PermissionDeniedError):  # only output files can be downloaded
        client.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    wrong = openai.OpenAI(api_key="sk-wrong", base_url=f"{emulator.url}/compatible-mode/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.list()
    raw = httpx.post(
        f"{emulator.url}/compatible-mode/v1/files",
        content=b"not multipart",
        headers={"Authorization": f"Bearer {emulator.api_key}", "Content-Type": "text/plain"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_parameter_error"


def test_failed_lines_and_refused_texts_go_to_the_error_file_uncharged(client, emulator):
    emulator.configure(batch_fail_rate=0.5, seed=1)
    lines = [line(f"c{i}", f"text {i}") for i in range(20)] + [line("bad", "x <<BLOCKED>>")]
    done = wait(client, submit(client, lines).id)
    assert done.status == "completed"
    out = client.files.content(done.output_file_id).text.splitlines()
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert len(out) + len(errors) == 21 and 0 < len(out) < 20
    assert done.request_counts.completed == len(out) and done.request_counts.failed == len(errors)
    codes = {e["custom_id"]: (e["response"]["status_code"], e["error"]["code"]) for e in errors}
    assert codes["bad"] == (400, "data_inspection_failed")
    assert {v for k, v in codes.items() if k != "bad"} == {(500, "internal_error")}
    assert len(emulator.bill()["requests"]) == len(out)


def test_an_expiring_job_keeps_half_its_lines(client, emulator):
    emulator.configure(batch_expire_rate=1.0)
    done = wait(client, submit(client, [line(f"c{i}", f"text {i}") for i in range(10)]).id)
    assert done.status == "expired" and done.expired_at is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 5)
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert len(emulator.bill()["requests"]) == 5


def test_batch_flags_and_config_rules():
    parser = add_parser(__import__("argparse").ArgumentParser().add_subparsers())
    args = parser.parse_args(
        ["--batch-duration-s", "2.5", "--batch-fail-rate", "0.1", "--batch-max-lines", "9"]
    )
    config = config_from_args(args)
    assert (config.batch_duration_s, config.batch_fail_rate, config.batch_max_lines) == (2.5, 0.1, 9)
    with pytest.raises(ValueError, match="batch_max_lines"):
        EmulatorConfig(batch_max_lines=50_001)
    with pytest.raises(ValueError, match="batch_expire_rate"):
        EmulatorConfig(batch_expire_rate=1.5)
