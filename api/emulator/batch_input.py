"""Batch API input checks: the create request (`input_file_id`, `endpoint`, `completion_window`,
`metadata`) and the input file's rules (lines per job, line size, JSON, `custom_id` present and
unique, the job's endpoint, one served model per file). A broken create request is refused;
a broken file fails the job (api/emulator/batch.py), with up to 20 reasons naming the line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from api.emulator.config import EmulatorConfig
from worker.catalog import MODELS

ENDPOINT = "/v1/embeddings"
MAX_LINE_BYTES = 6 * 1024 * 1024
WINDOW = re.compile(r"^(\d+)([hd])$")


class BatchError(Exception):
    """A Batch API request refused: HTTP status, OpenAI-style code and message."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def body(self, request_id: str) -> dict[str, Any]:
        error = {"message": self.message, "type": "invalid_request_error", "param": self.param}
        return {"error": {**error, "code": self.code}, "request_id": request_id}


def window_s(window: str) -> int:
    match = WINDOW.match(window)
    if not match:
        return 86_400
    return int(match.group(1)) * (3600 if match.group(2) == "h" else 86_400)


def job_request(body: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise BatchError(400, "invalid_parameter_error", "input_file_id is required", "input_file_id")
    if body.get("endpoint") != ENDPOINT:
        raise BatchError(400, "invalid_parameter_error", f"endpoint must be {ENDPOINT}", "endpoint")
    window = body.get("completion_window")
    text = window if isinstance(window, str) else ""
    if WINDOW.match(text) is None or not 24 * 3600 <= window_s(text) <= 336 * 3600:
        raise BatchError(
            400,
            "invalid_parameter_error",
            "completion_window must be hours or days from 24h to 336h, e.g. 24h or 14d",
            "completion_window",
        )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BatchError(400, "invalid_parameter_error", "metadata must be an object", "metadata")
    return file_id, text, metadata


def read_input(content: bytes, config: EmulatorConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input file's lines, and the rules it breaks (at most 20 reported)."""
    lines: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def problem(number: int, code: str, message: str) -> None:
        if len(problems) < 20:
            problems.append({"code": code, "message": message, "param": None, "line": number})

    raw_lines = [line for line in content.split(b"\n") if line.strip()]
    if len(raw_lines) > config.batch_max_lines:
        problem(0, "too_many_requests", f"A batch holds at most {config.batch_max_lines} requests.")
    for number, raw in enumerate(raw_lines, start=1):
        line, why = _input_line(raw, seen)
        if line is None:
            problem(number, *why)
            continue
        model = line["body"].get("model")
        if model not in MODELS or config.region not in MODELS[model].regions:
            problem(
                number,
                "model_not_found",
                f"The model `{model}` does not exist or you do not have access to it.",
            )
        models.add(str(model))
        lines.append(line)
    if len(models) > 1:
        problem(0, "mismatched_model", "A batch file must use one model in every line.")
    if not raw_lines:
        problem(0, "empty_file", "The input file has no request lines.")
    return lines, problems


def _input_line(raw: bytes, seen: set[str]) -> tuple[dict[str, Any] | None, tuple[str, str]]:
    if len(raw) > MAX_LINE_BYTES:
        return None, ("line_too_large", "Each line must be at most 6 MB.")
    try:
        line = json.loads(raw)
    except ValueError:
        return None, ("invalid_json_line", "The line is not valid JSON.")
    if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
        return None, ("invalid_request", "The line must be an object with a body object.")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, ("missing_custom_id", "Each line needs a custom_id string.")
    if custom_id in seen:
        return None, ("duplicate_custom_id", f"custom_id {custom_id} appears more than once.")
    seen.add(custom_id)
    if line.get("url") != ENDPOINT or line.get("method", "POST") != "POST":
        return None, ("invalid_url", f"Each line must be POST {ENDPOINT}, the batch's endpoint.")
    return line, ("", "")
