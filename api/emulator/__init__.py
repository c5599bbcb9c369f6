"""A faithful offline server of both DashScope embedding APIs (`sidecar emulator`).

Shapes, limits, codes and messages follow ../shared/spec/dashscope.md (§2 shapes, §2.3 request
ids, §3 models, §4 rate limits, §5 errors, §8 input rules). Per request, in this order:

    auth (401) -> JSON body (400) -> model served in the region (404) -> input and parameters
    (400) -> rate windows (429) -> injected faults (429, 500/503) -> moderation marker (400)
    -> vectors, bill, optional truncated body -> latency / hang sleep -> answer

Only requests answered with vectors are charged (a truncated 200 is charged too, as the
provider charged work the client could not read). The control endpoints under `/_emulator/`
need no key: `bill` (every charged request; `at` is unix seconds, a float), `log` (every
request received), `config` (GET, or POST a JSON patch applied live) and `reset`.

Choices where the spec is silent:
- `encoding_format`: only "float" (or omitted) is accepted, anything else is 400
  invalid_parameter_error; the docs say only float is supported, so a client relying on
  base64 fails here first instead of in production.
- Compatible mode ignores extra fields (text_type, output_type, instruct): document vectors.
- Rate windows are per model (limits are per account and model). rpm/tpm use a sliding 60 s
  window, rps/tps a 1 s window answered as burst protection. Requests rejected before the
  windows (401/400/404) do not count; admitted requests count even if a fault follows.
- `token_factor` scales the emulator's token count everywhere (usage, row limit, TPM), to
  simulate drift between a client's estimate and the provider's count; instruct is not billed.
- Compatible-mode 429 messages use the OpenAI wording the provider sends there (§4.3).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.catalog import COMPATIBLE_PATH, MODELS, NATIVE_PATH, REGION_URLS, ModelSpec
from worker.tokens import decode, encode, normalize

REGIONS = tuple(REGION_URLS)


@dataclass(frozen=True)
class EmulatorConfig:
    region: str = "beijing"
    api_keys: tuple[str, ...] = ("sk-emulator",)
    rpm: int | None = None  # requests per model per sliding minute; None = unlimited
    tpm: int | None = None  # tokens per model per sliding minute
    rps: int | None = None  # requests per model per second (burst protection)
    tps: int | None = None  # tokens per model per second (burst protection)
    latency_ms: float = 0.0
    error_rate: float = 0.0  # share answered 500 InternalError / 503 ModelServingError
    throttle_rate: float = 0.0  # share answered 429 with a random rate-limit code
    hang_rate: float = 0.0  # share that sleep hang_s before answering
    hang_s: float = 30.0
    truncate_rate: float = 0.0  # share answered 200 with a truncated JSON body
    inspection_marker: str = "<<BLOCKED>>"
    token_factor: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"region={self.region!r}: use one of {', '.join(REGIONS)}")
        if isinstance(self.api_keys, str) or not all(isinstance(k, str) for k in self.api_keys):
            raise ValueError("api_keys: a list of strings")
        for name in ("error_rate", "throttle_rate", "hang_rate", "truncate_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be within [0, 1]")
        for name in ("rpm", "tpm", "rps", "tps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1 or null")
        if self.latency_ms < 0 or self.hang_s < 0 or self.token_factor <= 0:
            raise ValueError("latency_ms and hang_s must be >= 0, token_factor > 0")
        if not self.inspection_marker:
            raise ValueError("inspection_marker: must not be empty")

    def patched(self, patch: dict) -> EmulatorConfig:
        """A copy with the JSON `patch` applied; ValueError names an unknown or bad field."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(patch) - names)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        if "api_keys" in patch and isinstance(patch["api_keys"], list):
            patch = {**patch, "api_keys": tuple(patch["api_keys"])}
        try:
            return dataclasses.replace(self, **patch)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


# --- vectors ------------------------------------------------------------------------------

_SLOTS_PER_TOKEN = 8  # each distinct token adds +-w at 8 hashed positions
_TEXT_WEIGHT = 0.5  # share of the per-text random component against the token component


def _seed(*fields: object) -> bytes:
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).digest()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (array arithmetic wraps silently)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _token_counts(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct token ids (sorted) and their sublinear weights 1 + ln(count)."""
    unique, counts = np.unique(np.asarray(ids, dtype=np.uint64), return_counts=True)
    return unique, 1.0 + np.log(counts)


def _dense(
    model: str, dims: int, text: str, ids: list[int], text_type: str, instruct: str | None
) -> np.ndarray:
    salt = np.uint64(int.from_bytes(_seed(model, dims)[:8], "little"))
    unique, weights = _token_counts(ids)
    slots = np.arange(_SLOTS_PER_TOKEN, dtype=np.uint64)
    hashed = _mix(unique[:, None] * np.uint64(_SLOTS_PER_TOKEN) + slots + salt)
    signs = np.where(hashed >> np.uint64(63), 1.0, -1.0) * weights[:, None]
    tokens = np.bincount((hashed % np.uint64(dims)).astype(np.intp).ravel(), signs.ravel(), dims)
    seed = _seed(model, dims, text_type, instruct, text)
    own = np.random.default_rng(int.from_bytes(seed[:16], "little")).standard_normal(dims)
    vector = _TEXT_WEIGHT * own / np.linalg.norm(own)
    norm = np.linalg.norm(tokens)
    if norm > 0:
        vector += tokens / norm
    return np.round(vector / np.linalg.norm(vector), 8)


def expected_vector(
    model: str, dimensions: int, text: str, text_type: str = "document", instruct: str | None = None
) -> list[float]:
    """The unit vector the emulator returns for `text`: a pure function of its arguments.

    A sum of hashed per-token directions (shared by query and document, so a query ranks
    documents sharing its words higher) plus a per-text component seeded from sha256 of
    (model, dimensions, text_type, instruct, NFC text), so query and document vectors differ.
    """
    text = normalize(text)
    return _dense(model, dimensions, text, encode(text), text_type, instruct).tolist()


@functools.lru_cache(maxsize=65536)
def _token_text(token_id: int) -> str:
    return decode([token_id])


def expected_sparse(model: str, text: str) -> list[dict]:
    """The sparse embedding of `text`: one entry per distinct Qwen token id, sorted by index."""
    return _sparse(model, encode(normalize(text)))


def _sparse(model: str, ids: list[int]) -> list[dict]:
    unique, weights = _token_counts(ids)
    salt = np.uint64(int.from_bytes(_seed(model, "sparse")[:8], "little"))
    base = 0.05 + 0.95 * (_mix(unique + salt) >> np.uint64(11)).astype(np.float64) / 2.0**53
    values = np.round(base * weights, 4).tolist()
    return [
        {"index": int(i), "value": v, "token": _token_text(int(i))} for i, v in zip(unique.tolist(), values)
    ]


# --- errors -------------------------------------------------------------------------------


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

    def body(self, api: str, request_id: str) -> dict:
        if api == "native":
            return {"code": self.code, "message": self.message, "request_id": request_id}
        error = {"message": self.compat_message, "type": self.compat_type, "param": None}
        return {"error": {**error, "code": self.compat_code}, "request_id": request_id}


_ILLEGAL = "BadRequest.IllegalInput"


def _invalid(message: str, code: str = "InvalidParameter") -> ProviderError:
    return ProviderError(400, code, "invalid_parameter_error", message)


def _unauthorized() -> ProviderError:
    return ProviderError(401, "InvalidApiKey", "invalid_api_key", "Incorrect API key provided.")


def _model_not_found(model: str) -> ProviderError:
    return ProviderError(
        404,
        "ModelNotFound",
        "model_not_found",
        "Model not exist.",
        compat_message=f"The model `{model}` does not exist or you do not have access to it.",
    )


def _too_long(spec: ModelSpec) -> ProviderError:
    return _invalid(f"Range of input length should be [1, {spec.max_tokens_per_row}]")


def _rpm() -> ProviderError:
    return ProviderError(
        429,
        "Throttling.RateQuota",
        "limit_requests",
        "Requests rate limit exceeded, please try again later.",
        compat_message="You exceeded your current requests list.",
        compat_type="limit_requests",
    )


def _tpm() -> ProviderError:
    return ProviderError(
        429,
        "Throttling.AllocationQuota",
        "insufficient_quota",
        "Allocated quota exceeded, please increase your quota limit.",
        compat_message="You exceeded your current quota, please check your plan and billing details.",
        compat_type="insufficient_quota",
    )


def _burst() -> ProviderError:
    return ProviderError(
        429,
        "Throttling.BurstRate",
        "limit_burst_rate",
        "Request rate increased too quickly. To ensure system stability, please adjust your "
        "client logic to scale requests more smoothly over time.",
        compat_type="limit_burst_rate",
    )


def _internal() -> ProviderError:
    return ProviderError(
        500,
        "InternalError",
        "internal_error",
        "An internal error has occured, please try again later or contact service support.",
        compat_type="internal_error",
    )


def _unavailable() -> ProviderError:
    return ProviderError(
        503,
        "ModelServingError",
        "model_serving_error",
        "Too many requests. Your requests are being throttled due to system capacity limits. "
        "Please try again later.",
        compat_type="model_serving_error",
    )


def _inspection() -> ProviderError:
    return ProviderError(
        400,
        "DataInspectionFailed",
        "data_inspection_failed",
        "Input data may contain inappropriate content.",
        compat_type="data_inspection_failed",
    )


# --- requests -----------------------------------------------------------------------------


@dataclass
class _Call:
    """One parsed, valid embedding request."""

    spec: ModelSpec
    texts: list[str]
    ids: list[list[int]]
    tokens: int  # provider-counted tokens (token_factor applied)
    dimensions: int
    text_type: str = "document"
    instruct: str | None = None
    dense: bool = True
    sparse: bool = False


def _texts(value: object) -> list[str]:
    if value is None or value == []:
        raise _invalid("Required input parameter missing from request.", "BadRequest.EmptyInput")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise _invalid("Value error, contents is neither str nor list of str.: input.contents")


def _describe(api: str, body: dict) -> tuple[str | None, int]:
    """Model name and row count of a request, for the log, even when it is invalid."""
    model = body.get("model") if isinstance(body.get("model"), str) else None
    texts = body.get("input")
    if api == "native":
        texts = texts.get("texts") if isinstance(texts, dict) else None
    return model, 1 if isinstance(texts, str) else len(texts) if isinstance(texts, list) else 0


def _parse(api: str, body: dict, config: EmulatorConfig) -> _Call:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid('Required parameter "model" missing from request.', "BadRequest.EmptyModel")
    spec = MODELS.get(model)
    if spec is None or config.region not in spec.regions:
        raise _model_not_found(model)
    if api == "native":
        payload = body.get("input")
        params = body.get("parameters") or {}
        if not isinstance(payload, dict) or not isinstance(params, dict):
            raise _invalid("Value error, input and parameters must be objects.")
        texts = _texts(payload.get("texts"))
        dims = params.get("dimension")
    else:
        texts = _texts(body.get("input"))
        dims = body.get("dimensions")
        params = {}
        if body.get("encoding_format", "float") not in ("float", None):
            raise _invalid("Value error, encoding_format only supports float.")
    if len(texts) > spec.max_rows:
        raise _invalid(f"Value error, batch size is invalid, it should not be larger than {spec.max_rows}.")
    dims = spec.default_dimensions if dims is None else dims
    if type(dims) is not int or dims not in spec.dimensions:
        allowed = ", ".join(str(d) for d in spec.dimensions)
        raise _invalid(f"Value error, dimension should be one of [{allowed}] for {spec.name}.")
    text_type = params.get("text_type") or "document"
    if text_type not in ("query", "document"):
        raise _invalid("Value error, text_type should be one of [query, document].")
    output_type = params.get("output_type") or "dense"
    if output_type not in ("dense", "sparse", "dense&sparse"):
        raise _invalid("Value error, output_type should be one of [dense, sparse, dense&sparse].")
    if output_type != "dense" and not spec.sparse:
        raise _invalid(f"Value error, output_type {output_type} is not supported by {spec.name}.")
    instruct = params.get("instruct")
    if instruct is not None and (not isinstance(instruct, str) or not spec.instruct):
        raise _invalid(f"Value error, instruct is not supported by {spec.name}.")
    texts = [normalize(t) for t in texts]
    ids = [encode(t) for t in texts]
    for text, row in zip(texts, ids):
        if not text.strip() or len(row) * config.token_factor > spec.max_tokens_per_row:
            raise _too_long(spec)
    tokens = round(sum(len(row) for row in ids) * config.token_factor)
    dense, sparse = "dense" in output_type, "sparse" in output_type
    return _Call(spec, texts, ids, tokens, dims, text_type, instruct, dense, sparse)


def _answer(api: str, call: _Call, request_id: str) -> dict:
    model, rows = call.spec.name, []
    for i, (text, ids) in enumerate(zip(call.texts, call.ids)):
        row: dict = {"text_index": i}
        if call.dense:
            vector = _dense(model, call.dimensions, text, ids, call.text_type, call.instruct)
            row["embedding"] = vector.tolist()
        if call.sparse:
            row["sparse_embedding"] = _sparse(model, ids)
        rows.append(row)
    if api == "native":
        usage = {"total_tokens": call.tokens}
        return {"output": {"embeddings": rows}, "usage": usage, "request_id": request_id}
    data = [
        {"object": "embedding", "index": row["text_index"], "embedding": row["embedding"]} for row in rows
    ]
    usage = {"prompt_tokens": call.tokens, "total_tokens": call.tokens}
    return {"object": "list", "model": model, "data": data, "usage": usage, "id": request_id}


# --- state --------------------------------------------------------------------------------


class _Window:
    """Requests and tokens admitted in the last `span_s` seconds."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.events: deque[tuple[float, int]] = deque()
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.span_s:
            self.tokens -= self.events.popleft()[1]
            self.requests -= 1

    def add(self, now: float, tokens: int) -> None:
        self.events.append((now, tokens))
        self.requests += 1
        self.tokens += tokens


class _State:
    """Config, bill, log, rate windows and the fault RNG, all behind one lock."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.lock = threading.Lock()
        self.config = config
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.bill: list[dict] = []
            self.total_tokens = 0
            self.log: list[dict] = []
            self.windows: dict[str, tuple[_Window, _Window]] = {}
            self.rng = random.Random(self.config.seed)

    def admit(self, model: str, tokens: int) -> ProviderError | None:
        """Check and record one request against the rate windows; the error if it is over."""
        now = time.monotonic()
        with self.lock:
            cfg = self.config
            minute, second = self.windows.setdefault(model, (_Window(60.0), _Window(1.0)))
            minute.expire(now)
            second.expire(now)
            if cfg.rpm is not None and minute.requests + 1 > cfg.rpm:
                return _rpm()
            if cfg.tpm is not None and minute.tokens + tokens > cfg.tpm:
                return _tpm()
            if (cfg.rps is not None and second.requests + 1 > cfg.rps) or (
                cfg.tps is not None and second.tokens + tokens > cfg.tps
            ):
                return _burst()
            minute.add(now, tokens)
            second.add(now, tokens)
            return None

    def draw(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self.lock:
            return self.rng.random() < rate

    def choice(self, options: list[Callable[[], ProviderError]]) -> ProviderError:
        with self.lock:
            return self.rng.choice(options)()

    def record(self, entry: dict, charged: bool) -> None:
        with self.lock:
            self.log.append(entry)
            if charged:
                keys = ("request_id", "model", "api", "tokens", "at")
                self.bill.append({k: entry[k] for k in keys})
                self.total_tokens += entry["tokens"]


def _bearer(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def _json(body: dict, status: int, request_id: str, *, truncate: bool = False) -> Response:
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    if truncate:
        content = content[: len(content) // 2]
    return Response(content, status, {"x-request-id": request_id}, media_type="application/json")


def create_app(config: EmulatorConfig) -> Starlette:
    """The ASGI app serving both embedding APIs and the `/_emulator/` control endpoints."""
    state = _State(config)

    async def embed(request: Request, api: str) -> Response:
        request_id = str(uuid.uuid4())
        cfg = state.config
        entry = {
            "request_id": request_id,
            "api": api,
            "model": None,
            "status": 200,
            "code": None,
            "rows": 0,
            "tokens": 0,
            "at": time.time(),
        }
        charged, truncate, hang = False, False, False
        try:
            if _bearer(request) not in cfg.api_keys:
                raise _unauthorized()
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise _invalid("The request body is not valid JSON.", _ILLEGAL) from None
            if not isinstance(body, dict):
                raise _invalid("The request body must be a JSON object.", _ILLEGAL)
            entry["model"], entry["rows"] = _describe(api, body)
            call = _parse(api, body, cfg)
            throttled = state.admit(call.spec.name, call.tokens)
            if throttled:
                raise throttled
            if state.draw(cfg.throttle_rate):
                raise state.choice([_rpm, _tpm, _burst])
            if state.draw(cfg.error_rate):
                raise state.choice([_internal, _unavailable])
            if any(cfg.inspection_marker in t for t in call.texts):
                raise _inspection()
            hang, truncate = state.draw(cfg.hang_rate), state.draw(cfg.truncate_rate)
            answer, status = _answer(api, call, request_id), 200
            charged, entry["tokens"] = True, call.tokens
        except ProviderError as exc:
            answer, status = exc.body(api, request_id), exc.status
            entry["code"] = exc.code if api == "native" else exc.compat_code
        entry["status"] = status
        state.record(entry, charged)
        delay_s = cfg.latency_ms / 1000 + (cfg.hang_s if hang else 0.0)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        return _json(answer, status, request_id, truncate=truncate)

    async def compatible(request: Request) -> Response:
        return await embed(request, "compatible")

    async def native(request: Request) -> Response:
        return await embed(request, "native")

    async def bill(request: Request) -> Response:
        with state.lock:
            return JSONResponse({"total_tokens": state.total_tokens, "requests": list(state.bill)})

    async def log(request: Request) -> Response:
        with state.lock:
            return JSONResponse(list(state.log))

    async def config_endpoint(request: Request) -> Response:
        if request.method == "POST":
            try:
                patch = json.loads(await request.body())
                if not isinstance(patch, dict):
                    raise ValueError("the body must be a JSON object of config fields")
                with state.lock:
                    state.config = state.config.patched(patch)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(dataclasses.asdict(state.config))

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    return Starlette(
        routes=[
            Route(COMPATIBLE_PATH, compatible, methods=["POST"]),
            Route(NATIVE_PATH, native, methods=["POST"]),
            Route("/_emulator/bill", bill, methods=["GET"]),
            Route("/_emulator/log", log, methods=["GET"]),
            Route("/_emulator/config", config_endpoint, methods=["GET", "POST"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
        ]
    )


def serve(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the emulator with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)


class RunningEmulator:
    """An emulator serving from a background thread of this process (demo, tests, benchmarks)."""

    def __init__(
        self, config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0
    ) -> None:
        import socket

        import httpx
        import uvicorn

        # IPPROTO_TCP explicitly: asyncio then sets TCP_NODELAY on accepted connections
        # (without it every small answer waits ~40 ms for delayed ACKs).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.config = config
        self.api_key = config.api_keys[0] if config.api_keys else None
        self._server = uvicorn.Server(
            uvicorn.Config(
                create_app(config), log_level="warning", access_log=False, timeout_graceful_shutdown=1
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="sidecar-emulator", daemon=True
        )
        self._thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=10.0)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                self.client.get("/_emulator/config").raise_for_status()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    self.stop()
                    raise RuntimeError(f"the emulator did not start on {self.url}") from None
                time.sleep(0.02)

    def configure(self, **fields: object) -> dict:
        return self.client.post("/_emulator/config", json=fields).raise_for_status().json()

    def bill(self) -> dict:
        return self.client.get("/_emulator/bill").raise_for_status().json()

    def log(self) -> list[dict]:
        return self.client.get("/_emulator/log").raise_for_status().json()

    def reset(self) -> None:
        self.client.post("/_emulator/reset").raise_for_status()
        self.configure(**dataclasses.asdict(self.config))

    def stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
        self._sock.close()


def start_in_thread(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> RunningEmulator:
    """Start the emulator on a background thread; `port=0` picks a free port (see `.url`)."""
    return RunningEmulator(config, host, port)


# --- CLI ----------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig of parsed `sidecar emulator` flags (unset flags keep defaults)."""
    fields = {f.name for f in dataclasses.fields(EmulatorConfig)} - {"api_keys"}
    values = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.api_key:
        values["api_keys"] = tuple(args.api_key)
    return EmulatorConfig(**values)


def _run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"sidecar emulator: {exc}")
        return 2
    url = f"http://{args.host}:{args.port}"
    print(f"emulator.listening url={url} region={config.region}", flush=True)
    serve(config, args.host, args.port)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sidecar emulator` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "emulator",
        help="serve an offline DashScope embedding emulator (both APIs, limits, faults, bill)",
        description="Serve both DashScope embedding APIs offline at the provider's paths. "
        "Control endpoints: GET /_emulator/bill, GET /_emulator/log, GET|POST /_emulator/config, "
        "POST /_emulator/reset.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8765, help="port to listen on (default 8765)")
    add("--region", choices=REGIONS, help="region whose models are served (default beijing)")
    add(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accepted API key; repeat for several (default sk-emulator)",
    )
    add("--rpm", type=int, help="requests per model per minute before 429 Throttling.RateQuota")
    add("--tpm", type=int, help="tokens per model per minute before 429 Throttling.AllocationQuota")
    add("--rps", type=int, help="requests per model per second before 429 Throttling.BurstRate")
    add("--tps", type=int, help="tokens per model per second before 429 Throttling.BurstRate")
    add("--latency-ms", type=float, help="added latency of every answer in milliseconds")
    add("--error-rate", type=float, help="share of requests answered 500/503 (0..1)")
    add("--throttle-rate", type=float, help="share of requests answered 429 at random (0..1)")
    add("--hang-rate", type=float, help="share of requests that sleep --hang-s first (0..1)")
    add("--hang-s", type=float, help="how long a hanging request sleeps (default 30)")
    add("--truncate-rate", type=float, help="share of 200 answers with a cut JSON body (0..1)")
    add(
        "--inspection-marker",
        help="texts containing this fail with DataInspectionFailed (default <<BLOCKED>>)",
    )
    add("--token-factor", type=float, help="scale counted tokens by this (simulates drift)")
    add("--seed", type=int, help="seed of the fault-injection random draws (default 0)")
    parser.set_defaults(func=_run)
    return parser
