"""DashScopeEmbedder: the error table, answers no honest server sends, and real HTTP to the emulator."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest

from worker.embedding.dashscope import DashScopeEmbedder, classify
from worker.errors import (
    AccountError,
    ConfigError,
    InputRejected,
    MalformedResponse,
    ProviderThrottled,
    ProviderUnavailable,
)
from worker.settings import Settings

KEY = "sk-test-0123456789abcdef"

# --- classify: status + code + message → error class (spec §4.3, §5.2) ---------------------------

CLASSIFY_TABLE = [
    (429, "Throttling", "Requests rate limit exceeded, please try again later.", ProviderThrottled),
    (429, "Throttling.RateQuota", "Requests rate limit exceeded", ProviderThrottled),
    (429, "Throttling.BurstRate", "Request rate increased too quickly.", ProviderThrottled),
    (429, "Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit.",
     ProviderThrottled),
    (429, "limit_requests", "You exceeded your current requests list.", ProviderThrottled),
    (429, "limit_burst_rate", "Request rate increased too quickly.", ProviderThrottled),
    (429, "insufficient_quota",
     "You exceeded your current quota, please check your plan and billing details.", ProviderThrottled),
    (429, None, "Too many requests. Batch requests are being throttled due to system capacity limits.",
     ProviderThrottled),
    (429, "Throttling.AllocationQuota", "Free allocated quota exceeded.", AccountError),
    (429, "PrepaidBillOverdue", "The prepaid bill is overdue.", AccountError),
    (429, "PostpaidBillOverdue", "The postpaid bill is overdue.", AccountError),
    (429, "CommodityNotPurchased", "Commodity has not purchased yet.", AccountError),
    (408, "RequestTimeOut", "Request timed out.", ProviderUnavailable),
    (500, "InternalError", "An internal error has occured.", ProviderUnavailable),
    (500, "InternalError.Algo", "Inference error.", ProviderUnavailable),
    (502, None, "<html>Bad Gateway</html>", ProviderUnavailable),
    (503, "ModelServingError",
     "Too many requests. Your requests are being throttled due to system capacity limits.",
     ProviderUnavailable),
    (504, None, "", ProviderUnavailable),
    (400, "DataInspectionFailed", "Input data may contain inappropriate content.", InputRejected),
    (400, "data_inspection_failed", "Input data may contain inappropriate content.", InputRejected),
    (400, "InvalidParameter", "Range of input length should be [1, 8192]", InputRejected),
    (400, "InvalidParameter", "Value error, batch size is invalid, it should not be larger than 10.",
     InputRejected),
    (400, "BadRequest.EmptyInput", "Required input parameter missing from request.", InputRejected),
    (400, "invalid_request_error", "Range of input length should be [1, 8192]", InputRejected),
    (413, "BadRequest.TooLarge", "Payload Too Large", InputRejected),
    (400, "Arrearage", "Access denied, please make sure your account is in good standing.", AccountError),
    (401, "InvalidApiKey", "Invalid API-key provided.", AccountError),
    (401, "invalid_api_key", "Incorrect API key provided.", AccountError),
    (403, "AccessDenied", "Access denied.", AccountError),
    (403, "AccessDenied.Unpurchased", "Access to model denied.", AccountError),
    (403, "AllocationQuota.FreeTierOnly", "The free tier of the model has been exhausted.", AccountError),
    (404, "ModelNotFound", "Model not found (text-embedding-v9)!", AccountError),
    (404, "model_not_found", "The model does not exist.", AccountError),
    (404, "model_not_supported", "Unsupported model for OpenAI compatibility mode.", AccountError),
    # §5.1: a 200 carrying a business error is classified by its code.
    (200, "Throttling.RateQuota", "Requests rate limit exceeded", ProviderThrottled),
    (200, "InvalidParameter", "Range of input length should be [1, 8192]", InputRejected),
    (200, "InvalidApiKey", "Invalid API-key provided.", AccountError),
    (200, "SomethingNew", "", MalformedResponse),
]  # fmt: skip


@pytest.mark.parametrize(("status", "code", "message", "expected"), CLASSIFY_TABLE)
def test_classify(status: int, code: str | None, message: str, expected: type) -> None:
    assert classify(status, code, message) is expected


# --- answers no faithful server sends on demand: a stub transport ---------------------------------

DIMS = 64


def stubbed(answer: httpx.Response, *, api: str = "compatible", sparse: bool = False) -> DashScopeEmbedder:
    return DashScopeEmbedder(
        root_url="http://provider.test",
        api_key=KEY,
        model="text-embedding-v4",
        dimensions=DIMS,
        api=api,
        sparse=sparse,
        transport=httpx.MockTransport(lambda request: answer),
    )


def compat_body(indices: list[int], *, dims: int = DIMS) -> dict:
    return {
        "object": "list",
        "model": "text-embedding-v4",
        "data": [{"object": "embedding", "index": i, "embedding": [i + 0.5] * dims} for i in indices],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
        "id": "req-compat",
    }


def native_body(indices: list[int]) -> dict:
    embeddings = [
        {
            "text_index": i,
            "embedding": [i + 0.5] * DIMS,
            "sparse_embedding": [{"index": 7149 + i, "value": 0.5}],
        }
        for i in indices
    ]
    return {"output": {"embeddings": embeddings}, "usage": {"total_tokens": 9}, "request_id": "req-native"}


def test_compatible_places_rows_by_index_not_position() -> None:
    result = stubbed(httpx.Response(200, json=compat_body([2, 0, 1]))).embed(["a", "b", "c"])
    assert [v[0] for v in result.vectors] == [0.5, 1.5, 2.5]
    assert (result.billed_tokens, result.request_id, result.http_status) == (7, "req-compat", 200)


def test_native_places_rows_by_text_index_with_sparse() -> None:
    embedder = stubbed(httpx.Response(200, json=native_body([1, 0])), api="native", sparse=True)
    result = embedder.embed(["a", "b"])
    assert [v[0] for v in result.vectors] == [0.5, 1.5]
    assert result.sparse == [{7149: 0.5}, {7150: 0.5}]
    assert (result.billed_tokens, result.request_id) == (9, "req-native")


def test_indices_zero_and_five_in_one_answer() -> None:
    texts = list("abcdef")
    result = stubbed(httpx.Response(200, json=compat_body([0, 5, 3, 1, 4, 2]))).embed(texts)
    assert [v[0] for v in result.vectors] == [i + 0.5 for i in range(6)]
    with pytest.raises(MalformedResponse):
        stubbed(httpx.Response(200, json=compat_body([0, 5]))).embed(["a", "b"])


def test_request_id_falls_back_to_header() -> None:
    body = compat_body([0])
    del body["id"]
    answer = httpx.Response(200, json=body, headers={"x-request-id": "req-header"})
    assert stubbed(answer).embed(["a"]).request_id == "req-header"


def _with(body: dict, **changes: object) -> dict:
    return {**body, **changes}


def _nan(body: dict, value: float) -> dict:
    body["data"][1]["embedding"][3] = value
    return body


MALFORMED = {
    "duplicate index": httpx.Response(200, json=compat_body([0, 0])),
    "index 0 missing, 2 out of range": httpx.Response(200, json=compat_body([1, 2])),
    "too few rows": httpx.Response(200, json=compat_body([0])),
    "too many rows": httpx.Response(200, json=compat_body([0, 1, 2])),
    "wrong dimension": httpx.Response(200, json=compat_body([0, 1], dims=DIMS - 1)),
    "NaN": httpx.Response(200, content=json.dumps(_nan(compat_body([0, 1]), math.nan))),
    "infinity": httpx.Response(200, content=json.dumps(_nan(compat_body([0, 1]), math.inf))),
    "non-number": httpx.Response(
        200, json=_with(compat_body([]), data=[{"index": i, "embedding": ["x"] * DIMS} for i in (0, 1)])
    ),
    "no usage": httpx.Response(200, json=_with(compat_body([0, 1]), usage=None)),
    "no token count": httpx.Response(200, json=_with(compat_body([0, 1]), usage={})),
    "truncated JSON": httpx.Response(200, content=json.dumps(compat_body([0, 1]))[:150]),
    "not an object": httpx.Response(200, json=[1, 2]),
    "200 with a code": httpx.Response(200, json={"code": "Weird", "message": "?", "request_id": "req-9"}),
}  # fmt: skip


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_answers_are_retried_later(answer: httpx.Response) -> None:
    with pytest.raises(MalformedResponse) as caught:
        stubbed(answer).embed(["a", "b"])
    assert caught.value.call.http_status == 200
    assert caught.value.call.latency_ms is not None


def test_native_missing_sparse_is_malformed() -> None:
    body = native_body([0])
    del body["output"]["embeddings"][0]["sparse_embedding"]
    with pytest.raises(MalformedResponse):
        stubbed(httpx.Response(200, json=body), api="native", sparse=True).embed(["a"])


def test_retry_after_headers_are_honoured() -> None:
    # DashScope documents no Retry-After (§4.3), so the emulator sends none; read it when present.
    error = {"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded", "request_id": "r"}
    for headers, seconds in (({"retry-after-ms": "1500"}, 1.5), ({"retry-after": "2"}, 2.0), ({}, None)):
        with pytest.raises(ProviderThrottled) as caught:
            stubbed(httpx.Response(429, json=error, headers=headers), api="native").embed(["a"])
        assert caught.value.retry_after_s == seconds
        assert caught.value.call.request_id == "r"


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "setting"),
    [
        ({"embedding_model": "text-embedding-v9"}, "SIDECAR_EMBEDDING_MODEL"),
        ({"embedding_dimensions": 999}, "SIDECAR_EMBEDDING_DIMENSIONS"),
        ({"embedding_model": "text-embedding-v2", "embedding_dimensions": 1536, "region": "singapore"},
         "SIDECAR_REGION"),
        ({"dashscope_api_key": None}, "DASHSCOPE_API_KEY"),
    ],
)  # fmt: skip
def test_from_settings_names_the_bad_setting(fields: dict, setting: str) -> None:
    settings = Settings(_env_file=None, **{"dashscope_api_key": KEY, **fields})
    with pytest.raises(ConfigError, match=setting):
        DashScopeEmbedder.from_settings(settings)


def test_sparse_needs_the_native_api() -> None:
    with pytest.raises(ConfigError):
        DashScopeEmbedder(
            root_url="http://x", api_key=KEY, model="text-embedding-v4", dimensions=64, sparse=True
        )


def test_unreachable_provider_is_unavailable_and_repr_hides_key() -> None:
    embedder = DashScopeEmbedder(
        root_url="http://127.0.0.1:9", api_key=KEY, model="text-embedding-v4", dimensions=64, timeout_s=2
    )
    with pytest.raises(ProviderUnavailable) as caught:
        embedder.embed(["a"])
    assert caught.value.call.http_status is None
    assert KEY not in repr(embedder) + str(caught.value) + repr(caught.value)
    embedder.close()


# --- real HTTP to the emulator -------------------------------------------------------------------


@pytest.fixture()
def connect(emulator) -> Iterator[Callable[..., DashScopeEmbedder]]:
    """Builds embedders against the emulator (v4, 256 dimensions unless told) and closes them."""
    made: list[DashScopeEmbedder] = []

    def make(**options: object) -> DashScopeEmbedder:
        options = {"model": "text-embedding-v4", "dimensions": 256, "api_key": emulator.api_key, **options}
        made.append(DashScopeEmbedder(root_url=emulator.url, **options))
        return made[-1]

    yield make
    for embedder in made:
        embedder.close()


def billed(emulator, request_id: str) -> dict:
    (entry,) = [r for r in emulator.bill()["requests"] if r["request_id"] == request_id]
    return entry


TEXTS = ["the quick brown fox", "jumps over", "the lazy dog 你好"]


@pytest.mark.parametrize("api", ["compatible", "native"])
def test_vectors_request_id_and_tokens_match_the_emulator(emulator, connect, api: str) -> None:
    from api.emulator import expected_vector

    result = connect(api=api).embed(TEXTS)
    expected = [expected_vector("text-embedding-v4", 256, text) for text in TEXTS]
    np.testing.assert_allclose(result.vectors, expected, atol=1e-6)
    assert result.billed_tokens == billed(emulator, result.request_id)["tokens"] > 0
    assert result.http_status == 200 and result.sparse is None


def test_native_query_with_instruct(connect) -> None:
    from api.emulator import expected_vector

    instruct = "Given a web search query, retrieve relevant passages"
    result = connect(api="native").embed(TEXTS[:1], text_type="query", instruct=instruct)
    expected = expected_vector("text-embedding-v4", 256, TEXTS[0], text_type="query", instruct=instruct)
    np.testing.assert_allclose(result.vectors[0], expected, atol=1e-6)


def test_native_v2_has_a_fixed_size(connect) -> None:
    from api.emulator import expected_vector

    result = connect(api="native", model="text-embedding-v2", dimensions=1536).embed(TEXTS)
    expected = [expected_vector("text-embedding-v2", 1536, text) for text in TEXTS]
    np.testing.assert_allclose(result.vectors, expected, atol=1e-6)


def test_native_sparse_output(connect) -> None:
    result = connect(api="native", sparse=True).embed(TEXTS)
    assert result.sparse is not None and len(result.sparse) == len(TEXTS)
    for row in result.sparse:
        assert row and all(isinstance(k, int) and isinstance(v, float) for k, v in row.items())


@pytest.mark.parametrize("api", ["compatible", "native"])
def test_wrong_key_is_an_account_error_that_hides_the_key(connect, api: str) -> None:
    wrong = "sk-wrong-key-abcdef0123456789"
    with pytest.raises(AccountError) as caught:
        connect(api=api, api_key=wrong).embed(TEXTS)
    assert caught.value.call.http_status == 401
    assert caught.value.call.error_code in ("InvalidApiKey", "invalid_api_key")
    assert caught.value.call.request_id
    assert wrong not in str(caught.value) + repr(caught.value) + repr(caught.value.call)


@pytest.mark.parametrize(
    ("fields", "error", "status"),
    [
        ({"throttle_rate": 1.0}, ProviderThrottled, 429),
        ({"error_rate": 1.0}, ProviderUnavailable, None),
        ({"truncate_rate": 1.0}, MalformedResponse, 200),
    ],
)
@pytest.mark.parametrize("api", ["compatible", "native"])
def test_injected_faults(emulator, connect, api: str, fields: dict, error: type, status: int | None) -> None:
    emulator.configure(**fields)
    with pytest.raises(error) as caught:
        connect(api=api).embed(TEXTS)
    call = caught.value.call
    assert call.http_status == status or (status is None and call.http_status >= 500)
    assert call.request_id and call.latency_ms is not None


def test_request_rate_limit_throttles(emulator, connect) -> None:
    emulator.configure(rpm=1)
    embedder = connect()
    embedder.embed(TEXTS[:1])
    with pytest.raises(ProviderThrottled) as caught:
        embedder.embed(TEXTS[:1])
    assert caught.value.call.error_code in ("Throttling.RateQuota", "limit_requests")


def test_hang_with_short_timeout_is_unavailable(emulator, connect) -> None:
    emulator.configure(hang_rate=1.0, hang_s=2)
    with pytest.raises(ProviderUnavailable):
        connect(timeout_s=0.3).embed(TEXTS)


@pytest.mark.parametrize("api", ["compatible", "native"])
def test_moderation_marker_is_rejected_input(emulator, connect, api: str) -> None:
    emulator.configure(inspection_marker="FORBIDDEN")
    with pytest.raises(InputRejected) as caught:
        connect(api=api).embed(["fine", "this is FORBIDDEN text"])
    assert caught.value.call.error_code in ("DataInspectionFailed", "data_inspection_failed")
    assert "FORBIDDEN" not in str(caught.value)


@pytest.mark.parametrize("texts", [["ok", ""], ["row"] * 11], ids=["empty text", "too many rows"])
def test_provider_limits_are_rejected_input(connect, texts: list[str]) -> None:
    with pytest.raises(InputRejected) as caught:
        connect(api="native").embed(texts)
    assert caught.value.call.http_status == 400
