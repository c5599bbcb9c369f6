"""Request parsing for both APIs: a JSON body in, a valid `EmbedCall` or a `ProviderError` out.

Native: `{"model", "input": {"texts"}, "parameters": {"dimension", "text_type", "output_type",
"instruct"}}`. Compatible: `{"model", "input", "dimensions", "encoding_format"}`. Choices where the
provider's documentation is silent:
- `encoding_format`: only "float" (or omitted) is accepted, anything else is 400
  invalid_parameter_error; the docs say only float is supported, so a client relying on base64
  fails here first instead of in production.
- Compatible mode ignores extra fields (text_type, output_type, instruct): document vectors.
- `token_factor` scales the emulator's token count everywhere (usage, row limit, TPM), to
  simulate drift between a client's estimate and the provider's count; instruct is not billed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.emulator.config import EmulatorConfig
from api.emulator.errors import invalid, model_not_found, too_long
from worker.catalog import MODELS, ModelSpec
from worker.tokens import encode, normalize

OUTPUT_TYPES = ("dense", "sparse", "dense&sparse")


@dataclass
class EmbedCall:
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


def describe(api: str, body: dict[str, Any]) -> tuple[str | None, int]:
    """Model name and row count of a request, for the log, even when it is invalid."""
    model = body.get("model") if isinstance(body.get("model"), str) else None
    texts = body.get("input")
    if api == "native":
        texts = texts.get("texts") if isinstance(texts, dict) else None
    return model, 1 if isinstance(texts, str) else len(texts) if isinstance(texts, list) else 0


def parse(api: str, body: dict[str, Any], config: EmulatorConfig) -> EmbedCall:
    """The call `body` asks for, checked in the provider's order; ProviderError if invalid."""
    spec = _served_model(body, config)
    texts, dims, params = _native_fields(body) if api == "native" else _compatible_fields(body)
    if len(texts) > spec.max_rows:
        raise invalid(f"Value error, batch size is invalid, it should not be larger than {spec.max_rows}.")
    dims = _dimensions(spec, dims)
    text_type, output_type, instruct = _options(spec, params)
    texts = [normalize(t) for t in texts]
    ids = [encode(t) for t in texts]
    for text, row in zip(texts, ids, strict=True):
        if not text.strip() or len(row) * config.token_factor > spec.max_tokens_per_row:
            raise too_long(spec)
    tokens = round(sum(len(row) for row in ids) * config.token_factor)
    dense, sparse = "dense" in output_type, "sparse" in output_type
    return EmbedCall(spec, texts, ids, tokens, dims, text_type, instruct, dense, sparse)


def _served_model(body: dict[str, Any], config: EmulatorConfig) -> ModelSpec:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid('Required parameter "model" missing from request.', "BadRequest.EmptyModel")
    spec = MODELS.get(model)
    if spec is None or config.region not in spec.regions:
        raise model_not_found(model)
    return spec


def _native_fields(body: dict[str, Any]) -> tuple[list[str], object, dict[str, Any]]:
    payload = body.get("input")
    params = body.get("parameters") or {}
    if not isinstance(payload, dict) or not isinstance(params, dict):
        raise invalid("Value error, input and parameters must be objects.")
    return _texts(payload.get("texts")), params.get("dimension"), params


def _compatible_fields(body: dict[str, Any]) -> tuple[list[str], object, dict[str, Any]]:
    texts = _texts(body.get("input"))
    if body.get("encoding_format", "float") not in ("float", None):
        raise invalid("Value error, encoding_format only supports float.")
    return texts, body.get("dimensions"), {}


def _texts(value: object) -> list[str]:
    if value is None or value == []:
        raise invalid("Required input parameter missing from request.", "BadRequest.EmptyInput")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise invalid("Value error, contents is neither str nor list of str.: input.contents")


def _dimensions(spec: ModelSpec, value: object) -> int:
    dims = spec.default_dimensions if value is None else value
    if type(dims) is not int or dims not in spec.dimensions:
        allowed = ", ".join(str(d) for d in spec.dimensions)
        raise invalid(f"Value error, dimension should be one of [{allowed}] for {spec.name}.")
    return dims


def _options(spec: ModelSpec, params: dict[str, Any]) -> tuple[str, str, str | None]:
    """text_type, output_type and instruct of native parameters, checked against the model."""
    text_type = params.get("text_type") or "document"
    if text_type not in ("query", "document"):
        raise invalid("Value error, text_type should be one of [query, document].")
    output_type = params.get("output_type") or "dense"
    if output_type not in OUTPUT_TYPES:
        raise invalid("Value error, output_type should be one of [dense, sparse, dense&sparse].")
    if output_type != "dense" and not spec.sparse:
        raise invalid(f"Value error, output_type {output_type} is not supported by {spec.name}.")
    instruct = params.get("instruct")
    if instruct is not None and (not isinstance(instruct, str) or not spec.instruct):
        raise invalid(f"Value error, instruct is not supported by {spec.name}.")
    return text_type, output_type, instruct
