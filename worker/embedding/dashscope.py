"""DashScope text embeddings over HTTP, through the OpenAI-compatible or the native API.

Results are placed by `index` / `text_index`, never by array position, and a 2xx answer is
checked (count, index, dimension, finite values, usage) before it is trusted. What the provider
sends back is bounded before it goes anywhere: error codes to 64 characters, messages to 512,
request ids to 128, `Retry-After` to 0..300 s. The gateway may answer 200 with a business error
and no result; that is an error answer too.

The compatible API takes no `text_type`, `instruct` or sparse output; those reach the provider
only through the native API.

Every error raised carries `.call` for the ledger and `maybe_charged`: true when the provider may
have billed a call that gave us nothing usable (a read timeout, a dropped or malformed answer),
false when no connection was made or the provider answered with an error.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import numpy as np
import orjson

from worker import catalog
from worker.embedding.base import EmbedResult, TextType
from worker.errors import (
    AccountError,
    CallInfo,
    ConfigError,
    GiveUp,
    InputRejected,
    MalformedResponse,
    ProviderThrottled,
    ProviderUnavailable,
    RetryLater,
)

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

MAX_CODE_CHARS = 64
MAX_MESSAGE_CHARS = 512
MAX_REQUEST_ID_CHARS = 128
MAX_RETRY_AFTER_S = 300.0

# DashScope's `insufficient_quota` is a per-minute TPM throttle, not billing.
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


def classify(status: int, code: str | None, message: str) -> type[RetryLater] | type[GiveUp]:
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
            self._transport_failed(exc, response, (time.perf_counter() - started) * 1000)
        ms = (time.perf_counter() - started) * 1000
        header_id = _bounded(response.headers.get("x-request-id"), MAX_REQUEST_ID_CHARS)
        body = _json_body(response)

        if not response.is_success or _is_error_body(body):
            code, message, request_id = _error_fields(body, response.text)
            message = self._scrub(message)
            call = CallInfo(response.status_code, code, request_id or header_id, ms, message)
            error = classify(response.status_code, code, message)
            self._fail(
                error,
                f"{response.status_code} {code or '-'}: {message}",
                call,
                None,
                retry_after_s=_retry_after_s(response.headers),
                # An error answer is not billed; a 2xx we cannot use may have been.
                maybe_charged=response.is_success or issubclass(error, MalformedResponse),
            )
        request_id = _body_request_id(body)
        call = CallInfo(response.status_code, None, request_id or header_id, ms)
        try:
            vectors, sparse, tokens = self._parse(body, len(texts))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._fail(
                MalformedResponse, f"malformed {self.api} answer: {exc}", call, exc, maybe_charged=True
            )
        log.debug(
            "embed.call request_id=%s rows=%d tokens=%d ms=%.0f", call.request_id, len(texts), tokens, ms
        )
        return EmbedResult(vectors, tokens, call.request_id, response.status_code, ms, sparse)

    def _transport_failed(
        self, exc: httpx.RequestError, response: httpx.Response | None, ms: float
    ) -> NoReturn:
        """A call that got no complete answer. Once the headers came, a body cut short (not a
        timeout) is a truncated answer; a connection never made was never billed."""
        call: CallInfo = CallInfo(latency_ms=ms)
        error: type[RetryLater] = ProviderUnavailable
        if response is not None:
            request_id = _bounded(response.headers.get("x-request-id"), MAX_REQUEST_ID_CHARS)
            call = CallInfo(response.status_code, None, request_id, ms)
            if not isinstance(exc, httpx.TimeoutException):
                error = MalformedResponse
        never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
        maybe_charged = error is MalformedResponse or (
            not never_sent and (response is None or response.is_success)
        )
        self._fail(error, f"{type(exc).__name__}: {exc}", call, exc, maybe_charged=maybe_charged)

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
        slots: list[dict[str, Any] | None] = [None] * rows
        for item in items:
            index = item[index_key]
            if not isinstance(index, int) or not 0 <= index < rows or slots[index] is not None:
                raise ValueError(f"{index_key}={index!r} is out of range or repeated")
            if len(item["embedding"]) != self.dimensions:
                raise ValueError(f"{len(item['embedding'])} dimensions, expected {self.dimensions}")
            slots[index] = item
        placed = [item for item in slots if item is not None]  # all of them: one per index
        vectors = [_finite_floats(item["embedding"]) for item in placed]
        sparse = None
        if self.sparse:
            sparse = [
                {int(entry["index"]): float(entry["value"]) for entry in item["sparse_embedding"]}
                for item in placed
            ]
        return vectors, sparse, tokens

    # --- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _fail(
        self,
        error: type[RetryLater] | type[GiveUp],
        message: str,
        call: CallInfo,
        cause: BaseException | None,
        *,
        retry_after_s: float | None = None,
        maybe_charged: bool,
    ) -> NoReturn:
        log.info(
            "embed.failed error=%s status=%s code=%s request_id=%s ms=%.0f",
            error.__name__, call.http_status, call.error_code, call.request_id, call.latency_ms or 0,
        )  # fmt: skip
        message = self._scrub(message)
        if issubclass(error, RetryLater):
            raise error(
                message, retry_after_s=retry_after_s, call=call, maybe_charged=maybe_charged
            ) from cause
        raise error(message, call=call, maybe_charged=maybe_charged) from cause


def _json_body(response: httpx.Response) -> Any:
    """The answer's JSON, or None when it is truncated or no JSON at all. orjson first (about 7
    times faster on a batch of float vectors); what it refuses and Python's parser takes (a lone
    surrogate, NaN) is read by the latter, so the checks after see the same values as before."""
    try:
        return orjson.loads(response.content)
    except ValueError:
        pass
    try:
        return json.loads(response.content)
    except (ValueError, RecursionError):
        return None


def _finite_floats(values: Any) -> list[float]:
    """An embedding as a list of finite floats. JSON's floats are taken as they are (no copy);
    anything else goes through numpy, which refuses what is no number."""
    if type(values) is list and all(type(x) is float for x in values) and math.isfinite(sum(values)):
        return values
    row = np.asarray(values, dtype=np.float64)
    if row.ndim != 1 or not np.isfinite(row).all():
        raise ValueError("embedding holds NaN or infinity")
    return [float(x) for x in row.tolist()]


def _is_error_body(body: Any) -> bool:
    """§5.1: the gateway may answer 200 with a business error and no result."""
    if not isinstance(body, dict):
        return False
    return bool(body.get("code") or body.get("error")) and not (body.get("output") or body.get("data"))


def _error_fields(body: Any, text: str) -> tuple[str | None, str, str | None]:
    """(code, message, request_id) of a native `{code, message}` or compatible `{error: {...}}` body,
    each bounded; any of them may be missing or of the wrong type."""
    if not isinstance(body, dict):
        return None, text[:MAX_MESSAGE_CHARS], None
    nested = body.get("error")
    error = nested if isinstance(nested, dict) else body
    code = _bounded(error.get("code") or error.get("type"), MAX_CODE_CHARS)
    message = error.get("message") or error.get("msg") or ""
    request_id = _bounded(body.get("request_id"), MAX_REQUEST_ID_CHARS)
    return code, str(message)[:MAX_MESSAGE_CHARS], request_id


def _body_request_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    return _bounded(body.get("id") or body.get("request_id"), MAX_REQUEST_ID_CHARS)


def _bounded(value: Any, limit: int) -> str | None:
    """A string or number the provider sent, as text of at most `limit` characters."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return str(value)[:limit]


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), clamped to
    0..MAX_RETRY_AFTER_S; None when absent or not a finite number or date."""
    if value := headers.get("retry-after-ms"):
        seconds = _number(value)
        return None if seconds is None else _clamped(seconds / 1000)
    if value := headers.get("retry-after"):
        seconds = _number(value)
        if seconds is None and (when := email.utils.parsedate_tz(value)) is not None:
            seconds = email.utils.mktime_tz(when) - time.time()
        return None if seconds is None else _clamped(seconds)
    return None


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _clamped(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
