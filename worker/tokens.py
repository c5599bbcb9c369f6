"""Offline token counts with the Qwen BPE that the `dashscope` wheel ships (qwen.tiktoken).

Nothing downloads: the rank file is read from the installed package and handed to tiktoken.
The encoding is built on first use (about 0.3 s) and kept for the process.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import unicodedata
from pathlib import Path

import tiktoken

# The Qwen pre-tokenizer pattern and special tokens, as in dashscope/tokenizers/qwen_tokenizer.py.
_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL_START_ID = 151643
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
# tiktoken's recursive merge can overflow the stack on one huge piece; encode in slices.
_SLICE_CHARS = 100_000


def rank_file() -> Path:
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dashscope package (which ships qwen.tiktoken) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"qwen.tiktoken not found at {path}")
    return path


@functools.cache
def encoding() -> tiktoken.Encoding:
    ranks: dict[bytes, int] = {}
    for line in rank_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = {tok: _SPECIAL_START_ID + i for i, tok in enumerate(_SPECIALS)}
    return tiktoken.Encoding("qwen", pat_str=_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def normalize(text: str) -> str:
    """NFC, the form the provider's tokenizer sees; used for hashing and caching too."""
    return unicodedata.normalize("NFC", text)


def encode(text: str) -> list[int]:
    """Token ids of `text` (NFC-normalised, special-token text encoded as plain text)."""
    text = normalize(text)
    enc = encoding()
    if len(text) <= _SLICE_CHARS:
        return enc.encode_ordinary(text)
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + _SLICE_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut > start:
                end = cut
        ids.extend(enc.encode_ordinary(text[start:end]))
        start = end
    return ids


def count_tokens(text: str) -> int:
    return len(encode(text))


def decode(ids: list[int]) -> str:
    return encoding().decode(ids)
