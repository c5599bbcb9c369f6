"""DashScope text embeddings over HTTP, through the OpenAI-compatible or the native API.

Facts from ../shared/spec/dashscope.md: request and response shapes §2, request ids §2.3, 429s
§4.3, error codes §5. Results are placed by `index` / `text_index`, never by array position, and a
2xx answer is checked (count, index, dimension, finite values, usage) before it is trusted.

The compatible API takes no `text_type`, `instruct` or sparse output (§2.1); those reach the
provider only through the native API.
"""

from __future__ import annotations

import email.utils
import logging
import time
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import numpy as np

from worker import catalog
from worker.embedding.base import EmbedResult, TextType
from worker.errors import (
    AccountError,
    CallInfo,
    ConfigError,
    InputRejected,
    MalformedResponse,
    ProviderThrottled,
    ProviderUnavailable,
    RetryLater,
    SidecarError,
)

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

# §4.3 and §5.2. DashScope's `insufficient_quota` is a per-minute TPM throttle, not billing.
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "Throttling.RateQuota",
        "Throttling.BurstRate",
        "Throttling.AllocationQuota",
        "LimitRequests",
        "limit_requests",
        "limit_burst_rate",
        "insufficient_quota",
    }
)
_BILLING_CODES = frozenset(
    {"Arrearage", "PrepaidBillOverdue", "PostpaidBillOverdue", "CommodityNotPurchased"}
)
_ACCOUNT_CODES = _BILLING_CODES | {
    "InvalidApiKey",
    "invalid_api_key",
    "NOT AUTHORIZED",
    "AccessDenied",
    "access_denied",
    "AccessDenied.Unpurchased",
    "Model.AccessDenied",
    "Workspace.AccessDenied",
    "AllocationQuota.FreeTierOnly",
    "ModelNotFound",
    "model_not_found",
    "model_not_supported",
    "WorkSpaceNotFound",
}
_INPUT_CODES = frozenset(
    {"InvalidParameter", "invalid_parameter_error", "DataInspectionFailed", "data_inspection_failed"}
)


def classify(status: int, code: str | None, message: str) -> type[SidecarError]:
    """The error class for a provider answer with this HTTP status, error code and message.

    Billing states win over everything (a 429 "Free allocated quota exceeded" is not a throttle);
    then 429 throttles, 408/5xx outages, key/access/model problems, and bad input. A 2xx that
    carries an unknown code is a MalformedResponse.
    """
    code = code or ""
    if code in _BILLING_CODES or "free allocated quota exceeded" in message.lower():
        return AccountError
    if status == 429 or code in _THROTTLE_CODES:
        return ProviderThrottled
    if status == 408 or status >= 500:
        return ProviderUnavailable
    if status in (401, 402, 403, 404) or code in _ACCOUNT_CODES or code.startswith("AccessDenied"):
        return AccountError
    if 400 <= status < 500 or code in _INPUT_CODES or code.startswith("BadRequest"):
        return InputRejected
    return MalformedResponse


class DashScopeEmbedder:
    """One DashScope model and size behind one keep-alive `httpx.Client`."""

    def __init__(
        self,
        *,
        root_url: str,
        api_key: str,
        model: str,
        dimensions: int,
        api: str = "compatible",
        timeout_s: float = 30.0,
        sparse: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        spec = catalog.get_model(model)
        if api not in catalog.API_PATHS:
            raise ConfigError(f"SIDECAR_EMBEDDING_API={api!r} is not an API; use compatible or native")
        if sparse and not (api == "native" and spec.sparse):
            raise ConfigError(f"sparse output needs the native API and a sparse model, not {api}/{model}")
        self.model = model
        self.dimensions = dimensions
        self.api = api
        self.sparse = sparse
        self._spec = spec
        self._path = catalog.API_PATHS[api]
        self._api_key = api_key  # kept only to scrub it from anything echoed back
        self._client = httpx.Client(
            base_url=root_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> DashScopeEmbedder:
        settings.model_spec()  # a ConfigError naming the setting if model, size or region cannot work
        if settings.dashscope_api_key is None:
            raise ConfigError("DASHSCOPE_API_KEY is not set")
        return cls(
            root_url=settings.provider_root(),
            api_key=settings.dashscope_api_key.get_secret_value(),
            model=settings.embedding_model,
            dimensions=settings.embedding_dimensions,
            api=settings.embedding_api,
            timeout_s=settings.request_timeout_s,
            sparse=settings.sparse_vectors,
        )

    def __repr__(self) -> str:
        return f"DashScopeEmbedder(model={self.model!r}, dimensions={self.dimensions}, api={self.api!r})"

    def close(self) -> None:
        self._client.close()

    def embed(
        self, texts: list[str], *, text_type: TextType = "document", instruct: str | None = None
    ) -> EmbedResult:
        payload = self._body(texts, text_type, instruct)
        started = time.perf_counter()
        response = None
        try:
            with self._client.stream("POST", self._path, json=payload) as response:
                response.read()
        except httpx.RequestError as exc:  # timeouts, refused or dropped connections
            ms = (time.perf_counter() - started) * 1000
            call, error = CallInfo(latency_ms=ms), ProviderUnavailable
            if response is not None:  # the headers came: a body cut short is a truncated answer
                call = CallInfo(response.status_code, None, response.headers.get("x-request-id"), ms)
                if not isinstance(exc, httpx.TimeoutException):
                    error = MalformedResponse
            self._fail(error, f"{type(exc).__name__}: {exc}", call, exc)
        ms = (time.perf_counter() - started) * 1000
        header_id = response.headers.get("x-request-id")
        try:
            body = response.json()
        except ValueError:  # truncated or not JSON at all
            body = None

        if not response.is_success or _is_error_body(body):
            code, message, request_id = _error_fields(body, response.text)
            call = CallInfo(response.status_code, code, request_id or header_id, ms, self._scrub(message))
            error = classify(response.status_code, code, message)
            self._fail(error, f"{response.status_code} {code or '-'}: {call.message}", call, None,
                       retry_after_s=_retry_after_s(response.headers))  # fmt: skip

        request_id = (body.get("id") or body.get("request_id")) if isinstance(body, dict) else None
        call = CallInfo(response.status_code, None, request_id or header_id, ms)
        try:
            vectors, sparse, tokens = self._parse(body, len(texts))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._fail(MalformedResponse, f"malformed {self.api} answer: {exc}", call, exc)
        log.debug(
            "embed.call request_id=%s rows=%d tokens=%d ms=%.0f", call.request_id, len(texts), tokens, ms
        )
        return EmbedResult(vectors, tokens, call.request_id, response.status_code, ms, sparse)

    # --- wire format --------------------------------------------------------------------------

    def _body(self, texts: list[str], text_type: TextType, instruct: str | None) -> dict[str, Any]:
        if self.api == "compatible":
            return {"model": self.model, "input": texts, "dimensions": self.dimensions,
                    "encoding_format": "float"}  # fmt: skip
        parameters: dict[str, Any] = {"text_type": text_type}
        if len(self._spec.dimensions) > 1:  # v1/v2 have one fixed size and take only text_type
            parameters["dimension"] = self.dimensions
            parameters["output_type"] = "dense&sparse" if self.sparse else "dense"
        if instruct and self._spec.instruct:
            parameters["instruct"] = instruct
        return {"model": self.model, "input": {"texts": texts}, "parameters": parameters}

    def _parse(self, body: Any, rows: int) -> tuple[list[list[float]], list[dict[int, float]] | None, int]:
        if not isinstance(body, dict):
            raise ValueError("the body is not a JSON object")
        usage = body.get("usage")
        if not isinstance(usage, dict):
            raise ValueError("the answer has no usage")
        if self.api == "compatible":
            items, index_key = body["data"], "index"
            tokens = usage.get("prompt_tokens", usage.get("total_tokens"))
        else:
            items, index_key = body["output"]["embeddings"], "text_index"
            tokens = usage.get("total_tokens")
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"usage has no token count: {usage!r}")
        if len(items) != rows:
            raise ValueError(f"{len(items)} embeddings for {rows} texts")
        placed: list[dict[str, Any] | None] = [None] * rows
        for item in items:
            index = item[index_key]
            if not isinstance(index, int) or not 0 <= index < rows or placed[index] is not None:
                raise ValueError(f"{index_key}={index!r} is out of range or repeated")
            if len(item["embedding"]) != self.dimensions:
                raise ValueError(f"{len(item['embedding'])} dimensions, expected {self.dimensions}")
            placed[index] = item
        matrix = np.asarray([item["embedding"] for item in placed], dtype=np.float64)
        if not np.isfinite(matrix).all():
            raise ValueError("embedding holds NaN or infinity")
        sparse = None
        if self.sparse:
            sparse = [
                {int(entry["index"]): float(entry["value"]) for entry in item["sparse_embedding"]}
                for item in placed
            ]
        return matrix.tolist(), sparse, tokens

    # --- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _fail(
        self,
        error: type[SidecarError],
        message: str,
        call: CallInfo,
        cause: BaseException | None,
        *,
        retry_after_s: float | None = None,
    ) -> NoReturn:
        log.info(
            "embed.failed error=%s status=%s code=%s request_id=%s ms=%.0f",
            error.__name__, call.http_status, call.error_code, call.request_id, call.latency_ms or 0,
        )  # fmt: skip
        message = self._scrub(message)
        if issubclass(error, RetryLater):
            raise error(message, retry_after_s=retry_after_s, call=call) from cause
        raise error(message, call=call) from cause


def _is_error_body(body: Any) -> bool:
    """§5.1: the gateway may answer 200 with a business error and no result."""
    if not isinstance(body, dict):
        return False
    return bool(body.get("code") or body.get("error")) and not (body.get("output") or body.get("data"))


def _error_fields(body: Any, text: str) -> tuple[str | None, str, str | None]:
    """(code, message, request_id) of a native `{code, message}` or compatible `{error: {...}}` body."""
    if not isinstance(body, dict):
        return None, text[:200], None
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    code = error.get("code") or error.get("type")
    message = error.get("message") or error.get("msg") or ""
    return (str(code) if code else None), str(message), body.get("request_id")


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), when sent (§4.3)."""
    value = None
    try:
        if value := headers.get("retry-after-ms"):
            return max(float(value) / 1000, 0.0)
        if value := headers.get("retry-after"):
            return max(float(value), 0.0)
    except ValueError:
        if value and (when := email.utils.parsedate_tz(value)) is not None:
            return max(email.utils.mktime_tz(when) - time.time(), 0.0)
    return None
