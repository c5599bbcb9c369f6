"""The provider's error catalogue, each error rendered in both APIs' formats.

Native API: `{"code", "message", "request_id"}`. Compatible mode (OpenAI-style):
`{"error": {"message", "type", "param", "code"}, "request_id"}`; its 429 messages use the OpenAI
wording the provider sends there.
"""

from __future__ import annotations

from typing import Any

from worker.catalog import ModelSpec

ILLEGAL_INPUT = "BadRequest.IllegalInput"


class ProviderError(Exception):
    """One provider error, rendered in each API's own format."""

    def __init__(
        self,
        status: int,
        code: str,
        compat_code: str,
        message: str,
        *,
        compat_message: str | None = None,
        compat_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.compat_code = compat_code
        self.message = message
        self.compat_message = compat_message or message
        self.compat_type = compat_type

    def code_in(self, api: str) -> str:
        """The error code as `api` ("native" or "compatible") reports it."""
        return self.code if api == "native" else self.compat_code

    def body(self, api: str, request_id: str) -> dict[str, Any]:
        if api == "native":
            return {"code": self.code, "message": self.message, "request_id": request_id}
        error = {"message": self.compat_message, "type": self.compat_type, "param": None}
        return {"error": {**error, "code": self.compat_code}, "request_id": request_id}


def invalid(message: str, code: str = "InvalidParameter") -> ProviderError:
    return ProviderError(400, code, "invalid_parameter_error", message)


def unauthorized() -> ProviderError:
    return ProviderError(401, "InvalidApiKey", "invalid_api_key", "Incorrect API key provided.")


def model_not_found(model: str) -> ProviderError:
    return ProviderError(
        404,
        "ModelNotFound",
        "model_not_found",
        "Model not exist.",
        compat_message=f"The model `{model}` does not exist or you do not have access to it.",
    )


def too_long(spec: ModelSpec) -> ProviderError:
    return invalid(f"Range of input length should be [1, {spec.max_tokens_per_row}]")


def rate_quota() -> ProviderError:
    """Requests per minute exceeded."""
    return ProviderError(
        429,
        "Throttling.RateQuota",
        "limit_requests",
        "Requests rate limit exceeded, please try again later.",
        compat_message="You exceeded your current requests list.",
        compat_type="limit_requests",
    )


def allocation_quota() -> ProviderError:
    """Tokens per minute exceeded."""
    return ProviderError(
        429,
        "Throttling.AllocationQuota",
        "insufficient_quota",
        "Allocated quota exceeded, please increase your quota limit.",
        compat_message="You exceeded your current quota, please check your plan and billing details.",
        compat_type="insufficient_quota",
    )


def burst_rate() -> ProviderError:
    """Requests or tokens per second exceeded."""
    return ProviderError(
        429,
        "Throttling.BurstRate",
        "limit_burst_rate",
        "Request rate increased too quickly. To ensure system stability, please adjust your "
        "client logic to scale requests more smoothly over time.",
        compat_type="limit_burst_rate",
    )


def internal() -> ProviderError:
    return ProviderError(
        500,
        "InternalError",
        "internal_error",
        "An internal error has occured, please try again later or contact service support.",
        compat_type="internal_error",
    )


def unavailable() -> ProviderError:
    return ProviderError(
        503,
        "ModelServingError",
        "model_serving_error",
        "Too many requests. Your requests are being throttled due to system capacity limits. "
        "Please try again later.",
        compat_type="model_serving_error",
    )


def inspection_failed() -> ProviderError:
    return ProviderError(
        400,
        "DataInspectionFailed",
        "data_inspection_failed",
        "Input data may contain inappropriate content.",
        compat_type="data_inspection_failed",
    )
