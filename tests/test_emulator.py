"""The DashScope emulator over real HTTP, through httpx and the official clients."""

from __future__ import annotations

import argparse
import json
import time

import dashscope
import httpx
import numpy as np
import openai
import pytest

from api.emulator import (
    ConfigFieldError,
    EmulatorConfig,
    ExposureError,
    add_parser,
    check_exposure,
    config_from_args,
    expected_sparse,
    expected_vector,
    start_in_thread,
)
from api.emulator.cli import CONTROL_TOKEN_ENV, control_token_of
from worker.catalog import COMPATIBLE_PATH, NATIVE_PATH
from worker.tokens import count_tokens, decode, encode

V4 = "text-embedding-v4"
TEXTS = ["the cat sat on the mat", "stock markets fell sharply today", "Café au lait ☕"]
LONG = "hello " * 8200  # more tokens than the 8,192 a v3/v4 row may hold


def post(emulator, api: str, body: object, key: str | None = "default") -> httpx.Response:
    key = emulator.api_key if key == "default" else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    path = COMPATIBLE_PATH if api == "compatible" else NATIVE_PATH
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers["Content-Type"] = "application/json"
    return emulator.client.post(path, content=content, headers=headers)


def body_for(api: str, texts: object, model: str = V4, **params: object) -> dict:
    if api == "compatible":
        return {"model": model, "input": texts, "encoding_format": "float", **params}
    return {"model": model, "input": {"texts": texts}, "parameters": params}


def error_of(api: str, response: httpx.Response) -> tuple[str, str, str]:
    """(code, message, request id) of an error body in the API's own format."""
    body = response.json()
    if api == "native":
        assert set(body) == {"code", "message", "request_id"}
        return body["code"], body["message"], body["request_id"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["code"], body["error"]["message"], body["request_id"]


@pytest.fixture()
def oai(emulator) -> openai.OpenAI:
    client = openai.OpenAI(
        api_key=emulator.api_key, base_url=emulator.url + "/compatible-mode/v1", max_retries=0
    )
    yield client
    client.close()


@pytest.fixture()
def native_sdk(emulator, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", emulator.url + "/api/v1")
    return dashscope.TextEmbedding


# --- success shapes -----------------------------------------------------------------------


def test_compatible_through_openai_client(emulator, oai):
    raw = oai.embeddings.with_raw_response.create(
        model=V4, input=TEXTS, dimensions=512, encoding_format="float"
    )
    result = raw.parse()
    body = json.loads(raw.content)
    assert set(body) == {"object", "model", "data", "usage", "id"}
    assert body["object"] == "list" and result.model == V4
    assert body["id"] == raw.headers["x-request-id"]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in result.data)
    for text, item in zip(TEXTS, result.data, strict=True):
        assert item.embedding == expected_vector(V4, 512, text)
        assert abs(np.linalg.norm(item.embedding) - 1.0) < 1e-6
    tokens = sum(count_tokens(t) for t in TEXTS)
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens


def test_compatible_single_string_and_default_dimension(emulator, oai):
    result = oai.embeddings.create(model="text-embedding-v3", input="alpha", encoding_format="float")
    assert len(result.data) == 1
    assert result.data[0].embedding == expected_vector("text-embedding-v3", 1024, "alpha")


def test_native_through_dashscope_sdk(emulator, native_sdk):
    resp = native_sdk.call(model=V4, input=TEXTS, api_key=emulator.api_key, dimension=256)
    assert resp.status_code == 200
    rows = resp.output["embeddings"]
    assert [r["text_index"] for r in rows] == [0, 1, 2]
    assert all(set(r) == {"text_index", "embedding"} for r in rows)
    for text, row in zip(TEXTS, rows, strict=True):
        assert row["embedding"] == expected_vector(V4, 256, text)
    assert resp.usage == {"total_tokens": sum(count_tokens(t) for t in TEXTS)}
    assert resp.request_id == emulator.bill()["requests"][0]["request_id"]


def test_native_request_id_in_body_and_header(emulator):
    response = post(emulator, "native", body_for("native", ["x"]))
    body = response.json()
    assert set(body) == {"output", "usage", "request_id"}
    assert body["request_id"] == response.headers["x-request-id"]
    assert len(body["request_id"]) == 36


def test_query_document_and_instruct_vectors_differ(emulator, native_sdk):
    def vector(**params):
        resp = native_sdk.call(model=V4, input="how to bake bread", api_key=emulator.api_key, **params)
        return resp.output["embeddings"][0]["embedding"]

    document, query = vector(), vector(text_type="query")
    instructed = vector(text_type="query", instruct="Retrieve recipes")
    assert document == expected_vector(V4, 1024, "how to bake bread", "document")
    assert query == expected_vector(V4, 1024, "how to bake bread", "query")
    assert instructed == expected_vector(V4, 1024, "how to bake bread", "query", "Retrieve recipes")
    assert len({tuple(document), tuple(query), tuple(instructed)}) == 3


def test_expected_vector_is_deterministic_unit_and_nfc_normalised():
    composed, decomposed = "Café", "Cafe\u0301"
    assert expected_vector(V4, 64, composed) == expected_vector(V4, 64, decomposed)
    assert expected_vector(V4, 64, "a") != expected_vector(V4, 128, "a")[:64]
    for dims in (64, 1024, 2048):
        assert abs(np.linalg.norm(expected_vector(V4, dims, "some text")) - 1.0) < 1e-6


def test_vectors_rank_documents_sharing_the_query_words_higher():
    docs = ["the cat sat on the mat", "stock markets fell", "a chocolate cake recipe"]
    query = np.array(expected_vector(V4, 1024, "cat on a mat", "query"))
    scores = [float(query @ np.array(expected_vector(V4, 1024, d))) for d in docs]
    assert scores.index(max(scores)) == 0


@pytest.mark.parametrize("output_type", ["sparse", "dense&sparse"])
def test_sparse_output(emulator, native_sdk, output_type):
    text = "wind and sorrow, wind again"
    resp = native_sdk.call(model=V4, input=[text], api_key=emulator.api_key, output_type=output_type)
    row = resp.output["embeddings"][0]
    assert ("embedding" in row) == (output_type == "dense&sparse")
    sparse = row["sparse_embedding"]
    ids = sorted(set(encode(text)))
    assert [e["index"] for e in sparse] == ids
    assert all(e["value"] > 0 and isinstance(e["token"], str) for e in sparse)
    assert [e["token"] for e in sparse] == [decode([i]) for i in ids]
    assert {"wind", " wind", " sorrow"} <= {e["token"] for e in sparse}
    assert sparse == expected_sparse(V4, text)


# --- rules --------------------------------------------------------------------------------

TOO_LONG = (400, "InvalidParameter", "invalid_parameter_error", "Range of input length should be [1, 8192]")
RULES = [
    pytest.param(
        body_for,
        {"texts": ["a"] * 11},
        None,
        (
            400,
            "InvalidParameter",
            "invalid_parameter_error",
            "Value error, batch size is invalid, it should not be larger than 10.",
        ),
        id="too-many-rows",
    ),
    pytest.param(body_for, {"texts": ["ok", LONG]}, None, TOO_LONG, id="too-long"),
    pytest.param(body_for, {"texts": ["ok", ""]}, None, TOO_LONG, id="empty-text"),
    pytest.param(body_for, {"texts": ["  \n "]}, None, TOO_LONG, id="blank-text"),
    pytest.param(
        body_for,
        {"texts": ["a"], "dims": 100},
        None,
        (400, "InvalidParameter", "invalid_parameter_error", None),
        id="bad-dimension",
    ),
    pytest.param(
        body_for,
        {"texts": ["a"], "model": "text-embedding-v9"},
        None,
        (404, "ModelNotFound", "model_not_found", None),
        id="unknown-model",
    ),
    pytest.param(
        body_for,
        {"texts": ["a"]},
        "",
        (401, "InvalidApiKey", "invalid_api_key", "Incorrect API key provided."),
        id="no-key",
    ),
    pytest.param(
        body_for,
        {"texts": ["a"]},
        "sk-wrong",
        (401, "InvalidApiKey", "invalid_api_key", "Incorrect API key provided."),
        id="wrong-key",
    ),
    pytest.param(
        None,
        b'{"model": "text-embedding-v4", ',
        None,
        (400, "BadRequest.IllegalInput", "invalid_parameter_error", None),
        id="malformed-json",
    ),
    pytest.param(
        body_for,
        {"texts": ["fine", "say <<BLOCKED>> here"]},
        None,
        (
            400,
            "DataInspectionFailed",
            "data_inspection_failed",
            "Input data may contain inappropriate content.",
        ),
        id="inspection",
    ),
]


@pytest.mark.parametrize("api", ["compatible", "native"])
@pytest.mark.parametrize("make, spec, key, expected", RULES)
def test_rejections_in_each_api_format(emulator, api, make, spec, key, expected):
    status, native_code, compat_code, message = expected
    if make is None:
        body = spec
    else:
        texts, model = spec["texts"], spec.get("model", V4)
        field = "dimensions" if api == "compatible" else "dimension"
        body = make(api, texts, model, **({field: spec["dims"]} if "dims" in spec else {}))
    response = post(emulator, api, body, key="default" if key is None else key)
    assert response.status_code == status
    code, text, request_id = error_of(api, response)
    assert code == (native_code if api == "native" else compat_code)
    if message:
        assert text == message
    assert request_id == response.headers["x-request-id"]
    assert emulator.bill() == {"total_tokens": 0, "requests": []}
    [entry] = emulator.log()
    assert (entry["request_id"], entry["status"], entry["code"]) == (request_id, status, code)


def test_model_not_served_in_region(emulator, oai):
    emulator.configure(region="singapore")
    with pytest.raises(openai.NotFoundError) as caught:
        oai.embeddings.create(model="text-embedding-v2", input="a", encoding_format="float")
    assert caught.value.code == "model_not_found"
    assert oai.embeddings.create(model=V4, input="a", encoding_format="float").data


def test_row_limit_follows_the_model(emulator, native_sdk):
    ok = native_sdk.call(model="text-embedding-v2", input=["a"] * 25, api_key=emulator.api_key)
    assert ok.status_code == 200 and len(ok.output["embeddings"]) == 25
    bad = native_sdk.call(model="text-embedding-v2", input=["a"] * 26, api_key=emulator.api_key)
    assert (bad.status_code, bad.code) == (400, "InvalidParameter")
    assert bad.message == "Value error, batch size is invalid, it should not be larger than 25."
    too_long = native_sdk.call(model="text-embedding-v2", input="word " * 2100, api_key=emulator.api_key)
    assert too_long.message == "Range of input length should be [1, 2048]"


def test_parameter_checks(emulator):
    def code(api, **params):
        return post(emulator, api, body_for(api, ["a"], **params)).status_code

    assert code("native", model="text-embedding-v1", output_type="sparse") == 400
    assert code("native", model="text-embedding-v3", instruct="x") == 400
    assert code("native", text_type="summary") == 400
    assert code("native", dimension=2048) == 200
    assert code("native", model="text-embedding-v3", dimension=2048) == 400
    assert code("compatible", dimensions="1024") == 400
    assert code("compatible", encoding_format="base64") == 400
    assert code("compatible", encoding_format=None) == 200


def test_errors_through_openai_client(emulator, oai):
    base_url = emulator.url + "/compatible-mode/v1"
    bad_key = openai.OpenAI(api_key="sk-nope", base_url=base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad_key.embeddings.create(model=V4, input="a", encoding_format="float")
    bad_key.close()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert caught.value.body["message"] == "Incorrect API key provided."
    assert caught.value.request_id == emulator.log()[0]["request_id"]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model=V4, input=["a"] * 11, encoding_format="float")
    assert caught.value.code == "invalid_parameter_error"
    with pytest.raises(openai.BadRequestError):  # openai-python defaults to base64
        oai.embeddings.create(model=V4, input="a")


def test_errors_through_dashscope_sdk(emulator, native_sdk):
    resp = native_sdk.call(model=V4, input="a", api_key="sk-nope")
    assert (resp.status_code, resp.code) == (401, "InvalidApiKey")
    assert resp.message == "Incorrect API key provided."
    assert resp.request_id == emulator.log()[0]["request_id"]
    resp = native_sdk.call(model="text-embedding-v9", input="a", api_key=emulator.api_key)
    assert (resp.status_code, resp.code) == (404, "ModelNotFound")


def test_token_factor_scales_usage(emulator, oai):
    emulator.configure(token_factor=1.5)
    result = oai.embeddings.create(model=V4, input=TEXTS, encoding_format="float")
    expected = round(sum(count_tokens(t) for t in TEXTS) * 1.5)
    assert result.usage.total_tokens == expected == emulator.bill()["total_tokens"]


# --- rate limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "api, limits, code, message",
    [
        (
            "native",
            {"rpm": 2},
            "Throttling.RateQuota",
            "Requests rate limit exceeded, please try again later.",
        ),
        ("compatible", {"rpm": 2}, "limit_requests", "You exceeded your current requests list."),
        (
            "native",
            {"tpm": 5},
            "Throttling.AllocationQuota",
            "Allocated quota exceeded, please increase your quota limit.",
        ),
        (
            "compatible",
            {"tpm": 5},
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        ("native", {"rps": 2}, "Throttling.BurstRate", None),
        ("compatible", {"tps": 5}, "limit_burst_rate", None),
    ],
)
def test_rate_limits(emulator, api, limits, code, message):
    emulator.configure(**limits)
    statuses = [post(emulator, api, body_for(api, ["one two"])).status_code for _ in range(2)]
    assert statuses == [200, 200]  # "one two" is 2 tokens: 4 of 5 allowed tokens used
    throttled = post(emulator, api, body_for(api, ["one two"]))
    assert throttled.status_code == 429
    got_code, got_message, _ = error_of(api, throttled)
    assert got_code == code
    if message:
        assert got_message == message
    assert len(emulator.bill()["requests"]) == 2
    assert [e["status"] for e in emulator.log()] == [200, 200, 429]


def test_limits_are_per_model(emulator):
    emulator.configure(rpm=1)
    assert post(emulator, "native", body_for("native", ["a"])).status_code == 200
    v3 = body_for("native", ["a"], "text-embedding-v3")
    assert post(emulator, "native", v3).status_code == 200
    assert post(emulator, "native", body_for("native", ["a"])).status_code == 429


def test_burst_window_recovers_within_a_second(emulator):
    emulator.configure(rps=1)
    assert post(emulator, "native", body_for("native", ["a"])).status_code == 200
    assert post(emulator, "native", body_for("native", ["a"])).status_code == 429
    deadline = time.monotonic() + 3.0
    while post(emulator, "native", body_for("native", ["a"])).status_code == 429:
        assert time.monotonic() < deadline, "the 1 s window never reopened"
        time.sleep(0.05)


# --- injected faults ----------------------------------------------------------------------


@pytest.mark.parametrize("api", ["compatible", "native"])
def test_error_rate(emulator, api):
    emulator.configure(error_rate=1.0)
    responses = [post(emulator, api, body_for(api, ["a"])) for _ in range(12)]
    codes = {(r.status_code, error_of(api, r)[0]) for r in responses}
    expected = {
        "native": {(500, "InternalError"), (503, "ModelServingError")},
        "compatible": {(500, "internal_error"), (503, "model_serving_error")},
    }[api]
    assert codes == expected
    assert emulator.bill()["total_tokens"] == 0


def test_throttle_rate(emulator):
    emulator.configure(throttle_rate=1.0)
    responses = [post(emulator, "native", body_for("native", ["a"])) for _ in range(20)]
    assert {r.status_code for r in responses} == {429}
    assert {r.json()["code"] for r in responses} == {
        "Throttling.RateQuota",
        "Throttling.AllocationQuota",
        "Throttling.BurstRate",
    }
    assert emulator.bill()["requests"] == []


def test_fault_draws_follow_the_seed(emulator):
    def run() -> list[int]:
        emulator.reset()
        emulator.configure(error_rate=0.5, seed=7)
        emulator.client.post("/_emulator/reset")  # reseeds the fault RNG from the new seed
        return [post(emulator, "native", body_for("native", ["a"])).status_code for _ in range(10)]

    first = run()
    assert first == run() and len(set(first)) > 1


def test_hang_exercises_client_timeouts(emulator, oai):
    emulator.configure(hang_rate=1.0, hang_s=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient = oai.with_options(timeout=0.1)
        impatient.embeddings.create(model=V4, input="a", encoding_format="float")
    assert len(emulator.bill()["requests"]) == 1  # the provider charged work nobody read


def test_latency(emulator):
    emulator.configure(latency_ms=200)
    started = time.monotonic()
    assert post(emulator, "native", body_for("native", ["a"])).status_code == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("api", ["compatible", "native"])
def test_truncated_body(emulator, api):
    emulator.configure(truncate_rate=1.0)
    response = post(emulator, api, body_for(api, ["a"]))
    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert emulator.bill()["requests"][0]["request_id"] == response.headers["x-request-id"]


# --- bill, log, config --------------------------------------------------------------------


def test_bill_lists_every_charged_request(emulator, oai, native_sdk):
    started = time.time()
    oai.embeddings.create(model=V4, input=TEXTS[:2], encoding_format="float")
    native_sdk.call(model="text-embedding-v3", input=TEXTS, api_key=emulator.api_key)
    post(emulator, "native", body_for("native", [""]))  # rejected: not billed
    bill = emulator.bill()
    assert set(bill) == {"total_tokens", "requests"}
    assert [(r["api"], r["model"]) for r in bill["requests"]] == [
        ("compatible", V4),
        ("native", "text-embedding-v3"),
    ]
    assert [r["tokens"] for r in bill["requests"]] == [
        sum(count_tokens(t) for t in TEXTS[:2]),
        sum(count_tokens(t) for t in TEXTS),
    ]
    assert bill["total_tokens"] == sum(r["tokens"] for r in bill["requests"])
    assert all(set(r) == {"request_id", "model", "api", "tokens", "at"} for r in bill["requests"])
    assert all(isinstance(r["at"], float) and r["at"] >= started - 1 for r in bill["requests"])
    log = emulator.log()
    assert [(e["status"], e["rows"]) for e in log] == [(200, 2), (200, 3), (400, 1)]
    assert set(log[0]) == {"request_id", "api", "model", "status", "code", "rows", "tokens", "at"}


def test_config_endpoint_and_reset(emulator):
    config = emulator.client.get("/_emulator/config").json()
    assert config["region"] == "beijing" and config["api_keys"] == ["***"]  # keys are never echoed
    assert emulator.configure(api_keys=["sk-a", "sk-b"], rpm=10)["rpm"] == 10
    assert post(emulator, "native", body_for("native", ["a"]), key="sk-b").status_code == 200
    assert post(emulator, "native", body_for("native", ["a"])).status_code == 401
    for bad in ({"nope": 1}, {"region": "mars"}, {"error_rate": 2}):
        assert emulator.client.post("/_emulator/config", json=bad).status_code == 422
    emulator.client.post("/_emulator/reset")
    assert emulator.bill() == {"total_tokens": 0, "requests": []} and emulator.log() == []


def test_cli_parser_builds_the_config():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "emulator",
            "--port",
            "9000",
            "--rpm",
            "60",
            "--error-rate",
            "0.1",
            "--region",
            "singapore",
            "--api-key",
            "sk-1",
            "--api-key",
            "sk-2",
            "--hang-s",
            "2",
            "--inspection-marker",
            "XX",
        ]
    )
    assert (args.host, args.port) == ("127.0.0.1", 9000) and callable(args.func)
    config = config_from_args(args)
    assert config == EmulatorConfig(
        region="singapore",
        api_keys=("sk-1", "sk-2"),
        rpm=60,
        error_rate=0.1,
        hang_s=2.0,
        inspection_marker="XX",
    )


# --- config validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"latency_ms": Infinity}', "latency_ms"),
        (b'{"latency_ms": NaN}', "latency_ms"),
        (b'{"latency_ms": -1}', "latency_ms"),
        (b'{"latency_ms": 600001}', "latency_ms"),
        (b'{"hang_s": -Infinity}', "hang_s"),
        (b'{"error_rate": -0.1}', "error_rate"),
        (b'{"truncate_rate": NaN}', "truncate_rate"),
        (b'{"token_factor": 0}', "token_factor"),
        (b'{"token_factor": 1e400}', "token_factor"),
        (b'{"rpm": 0}', "rpm"),
        (b'{"tpm": 1.5}', "tpm"),
        (b'{"rps": true}', "rps"),
        (b'{"seed": "x"}', "seed"),
        (b'{"region": "mars"}', "region"),
        (b'{"api_keys": "sk-one"}', "api_keys"),
        (b'{"inspection_marker": ""}', "inspection_marker"),
        (b'{"latency_ms": 5, "nope": 1}', "nope"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(emulator, raw, field):
    before = emulator.client.get("/_emulator/config").json()
    response = emulator.client.post(
        "/_emulator/config", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == field and body["error"].startswith(f"{field}: ")
    assert body["rule"] in body["error"]
    assert emulator.client.get("/_emulator/config").json() == before  # nothing applied


def test_config_rejects_a_body_that_is_not_an_object(emulator):
    post_config = emulator.client.post
    assert post_config("/_emulator/config", content=b"{nope").status_code == 400
    assert post_config("/_emulator/config", json=[1]).status_code == 422


def test_config_never_echoes_api_keys(emulator):
    answer = emulator.client.post("/_emulator/config", json={"api_keys": ["sk-secret-1", "sk-secret-2"]})
    assert answer.status_code == 200 and answer.json()["api_keys"] == ["***", "***"]
    assert "sk-secret" not in answer.text
    assert "sk-secret" not in emulator.client.get("/_emulator/config").text
    assert post(emulator, "native", body_for("native", ["a"]), key="sk-secret-2").status_code == 200


def test_config_rules_apply_to_the_cli_config_too():
    with pytest.raises(ConfigFieldError) as caught:
        EmulatorConfig(latency_ms=float("nan"))
    assert caught.value.field == "latency_ms"
    with pytest.raises(ConfigFieldError, match="token_factor"):
        EmulatorConfig(token_factor=float("inf"))


# --- control token ------------------------------------------------------------------------

CONTROL = [
    ("GET", "/_emulator/bill"),
    ("GET", "/_emulator/log"),
    ("GET", "/_emulator/config"),
    ("POST", "/_emulator/config"),
    ("POST", "/_emulator/reset"),
]


@pytest.fixture(scope="module")
def guarded():
    running = start_in_thread(EmulatorConfig(), control_token="ctl-token-1")
    yield running
    running.stop()


@pytest.mark.parametrize("method, path", CONTROL)
def test_control_endpoints_need_the_token(guarded, method, path):
    kwargs = {"json": {}} if path.endswith("config") and method == "POST" else {}
    for headers in ({}, {"Authorization": "Bearer ctl-token-2"}, {"Authorization": "ctl-token-1"}):
        refused = guarded.client.request(method, path, headers=headers, **kwargs)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
    allowed = {"Authorization": "Bearer ctl-token-1"}
    assert guarded.client.request(method, path, headers=allowed, **kwargs).status_code == 200


def test_guarded_emulator_still_serves_embeddings(guarded):
    assert post(guarded, "native", body_for("native", ["a"])).status_code == 200
    assert guarded.bill()["total_tokens"] == count_tokens("a")  # the handle sends the token
    guarded.reset()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_control_token(host):
    check_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "emulator"])
def test_beyond_loopback_needs_a_control_token(host):
    with pytest.raises(ExposureError, match="control token"):
        check_exposure(host, None)
    with pytest.raises(ExposureError):
        check_exposure(host, "")
    check_exposure(host, "ctl-token")


def test_cli_refuses_to_listen_beyond_loopback_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv(CONTROL_TOKEN_ENV, raising=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["emulator", "--host", "0.0.0.0", "--port", "0"])
    assert args.func(args) == 2
    error = capsys.readouterr().err
    assert "0.0.0.0" in error and "SIDECAR_EMULATOR_CONTROL_TOKEN" in error


def test_cli_takes_the_control_token_from_flag_or_environment():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    plain = parser.parse_args(["emulator"])
    flagged = parser.parse_args(["emulator", "--control-token", "from-flag"])
    assert control_token_of(plain, {}) is None
    assert control_token_of(plain, {CONTROL_TOKEN_ENV: ""}) is None
    assert control_token_of(plain, {CONTROL_TOKEN_ENV: "from-env"}) == "from-env"
    assert control_token_of(flagged, {CONTROL_TOKEN_ENV: "from-env"}) == "from-flag"
