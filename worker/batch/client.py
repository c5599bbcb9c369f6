"""The provider's Batch File API over HTTP : upload a JSONL file,
create a job, read it, find it by its `ds_name`, download its output and error files.

Errors are translated at this boundary: 429, 5xx and transport failures are ProviderUnavailable
(retry later); key and access problems AccountError; anything else 4xx InputRejected. Nothing
here is billed (the provider bills the lines a job runs), so no call is `maybe_charged`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from worker.embedding.dashscope import classify
from worker.errors import CallInfo, ProviderUnavailable, RetryLater

if TYPE_CHECKING:
    from worker.settings import Settings

COMPATIBLE_BASE = "/compatible-mode/v1"
ENDPOINT = "/v1/embeddings"
MAX_MESSAGE_CHARS = 512


class BatchClient:
    """One keep-alive httpx client on `{root}/compatible-mode/v1`."""

    def __init__(self, *, root_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self._api_key = api_key
        self._client = httpx.Client(
            base_url=root_url.rstrip("/") + COMPATIBLE_BASE,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchClient:
        key = settings.dashscope_api_key
        return cls(
            root_url=settings.provider_root(),
            api_key=key.get_secret_value() if key is not None else "",
            timeout_s=max(60.0, settings.request_timeout_s),
        )

    def close(self) -> None:
        self._client.close()

    def upload(self, content: bytes, filename: str) -> str:
        """Upload a JSONL input file (purpose=batch); its file id."""
        files = {"file": (filename, content, "application/jsonl")}
        body = self._json("POST", "/files", files=files, data={"purpose": "batch"})
        return str(body["id"])

    def create(self, input_file_id: str, *, completion_window: str, ds_name: str) -> dict[str, Any]:
        """Create a job over an uploaded file, named `ds_name` (our job id) so it can be found again."""
        payload = {
            "input_file_id": input_file_id,
            "endpoint": ENDPOINT,
            "completion_window": completion_window,
            "metadata": {"ds_name": ds_name, "ds_description": "vector-sidecar batch lane"},
        }
        return self._json("POST", "/batches", json=payload)

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/batches/{batch_id}")

    def find(self, ds_name: str) -> dict[str, Any] | None:
        """The job created under `ds_name`, if one was (a crash may have hidden its id from us)."""
        body = self._json("GET", "/batches", params={"ds_name": ds_name, "limit": 100})
        for job in body.get("data") or []:
            if isinstance(job, dict) and (job.get("metadata") or {}).get("ds_name") == ds_name:
                return job
        return None

    def content(self, file_id: str) -> bytes:
        response = self._send("GET", f"/files/{file_id}/content")
        return response.content

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"batch API {method} {path}: the answer is not a JSON object")
        return body

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.RequestError as exc:
            raise ProviderUnavailable(f"batch API {method} {path}: {type(exc).__name__}") from exc
        if response.is_success:
            return response
        code, message = _error_of(response)
        message = message.replace(self._api_key, "***") if self._api_key else message
        call = CallInfo(response.status_code, code, response.headers.get("x-request-id"), None, message)
        error = classify(response.status_code, code, message)
        text = f"batch API {method} {path}: {response.status_code} {code or '-'}: {message}"
        if issubclass(error, RetryLater):
            raise error(text, call=call)
        raise error(text, call=call)


def _error_of(response: httpx.Response) -> tuple[str | None, str]:
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:MAX_MESSAGE_CHARS]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, str(body)[:MAX_MESSAGE_CHARS]
    code = error.get("code")
    return (str(code)[:64] if code else None), str(error.get("message", ""))[:MAX_MESSAGE_CHARS]
