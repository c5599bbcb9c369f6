"""Split a document into token-bounded chunks for the embedding provider.

The text is NFC-normalised and encoded once; windows of `max_tokens` tokens are laid over the
token offsets and each window is cut back to the best boundary in its second half:
paragraph (blank line) > line > sentence end (. ! ? ; and CJK 。！？；) > whitespace > the
window's last whole character. Chunk texts are slices of the normalised text with surrounding
whitespace stripped, so with no overlap the chunks, in order and separated only by whitespace,
are the whole text. Every chunk is re-counted on its own (BPE counts are not additive across a
cut) and its window shrunk until it fits: `count_tokens(chunk.text) <= max_tokens` always holds.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from dataclasses import dataclass

from worker import tokens

# Any single character is at most 4 UTF-8 bytes, so at most 4 tokens on its own.
MIN_MAX_TOKENS = 4
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
_SENTENCE_END = re.compile(r"[.!?;…][\"'”’»)\]]*(?=\s)|[。！？；][」』”’）]*")
_SPACE = re.compile(r"\s")
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)
_NON_SPACE = re.compile(r"\S")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    tokens: int
    content_hash: str


def default_max_tokens(model_max_tokens_per_row: int) -> int:
    """Chunk size just under the model's row limit: 2% off, at most 64 tokens."""
    return model_max_tokens_per_row - min(64, max(1, model_max_tokens_per_row // 50))


def token_limit(configured: int | None, max_tokens_per_row: int) -> int:
    """The chunk size in tokens: the configured one (SIDECAR_CHUNK_MAX_TOKENS), else just under the
    model's row limit; never over the row limit."""
    return min(configured or default_max_tokens(max_tokens_per_row), max_tokens_per_row)


def content_hash(text: str) -> str:
    return hashlib.sha256(tokens.normalize(text).encode("utf-8")).hexdigest()


def split_text(text: str, *, max_tokens: int, overlap_tokens: int = 0) -> list[Chunk]:
    if max_tokens < MIN_MAX_TOKENS:
        raise ValueError(f"max_tokens must be >= {MIN_MAX_TOKENS}, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens / 2:
        raise ValueError(
            f"overlap_tokens must be >= 0 and below max_tokens/2 ({max_tokens / 2:g}), got {overlap_tokens}"
        )
    text = tokens.normalize(text)
    starts = _token_starts(tokens.encode(text))
    chunks: list[Chunk] = []
    start = _skip_space(text, 0)
    while start < len(text):
        cut, piece, count = _next_piece(text, starts, start, max_tokens)
        chunks.append(Chunk(len(chunks), piece, count, content_hash(piece)))
        start = _skip_space(text, _overlap_start(text, starts, start, cut, overlap_tokens))
    return chunks


def _next_piece(text: str, starts: list[int], start: int, max_tokens: int) -> tuple[int, str, int]:
    """The cut after `start` whose stripped piece counts at most `max_tokens` on its own."""
    first = bisect_right(starts, start) - 1  # the token holding `start`
    budget = max_tokens
    while True:
        end = _char_at(text, starts, first + budget) if budget > 0 else start
        if end >= len(text):
            cut = len(text)
        else:
            half = max(start + 1, _char_at(text, starts, first + budget // 2))
            cut = _boundary(text, half, end) if end > start else start + 1
        piece = text[start:cut].strip()
        count = tokens.count_tokens(piece)
        if count <= max_tokens or cut == start + 1:
            return cut, piece, count
        budget = min(budget - 1, budget - (count - max_tokens))


def _boundary(text: str, lo: int, end: int) -> int:
    """The best cut in [lo, end], the latest of the strongest kind, else `end`. Whitespace
    after a cut is stripped from the piece, so a separator may reach just past `end`."""
    for separator in ("\n\n", "\n"):
        at = text.rfind(separator, lo - len(separator), end + len(separator))
        if at >= 0:
            return at + len(separator)
    ends = [m.end() for m in _SENTENCE_END.finditer(text, lo - 1, end + 1) if m.end() <= end]
    if ends:
        return ends[-1]
    space = _LAST_SPACE.match(text, lo, end + 1)
    return space.end() - 1 if space else end


def _overlap_start(text: str, starts: list[int], start: int, cut: int, overlap_tokens: int) -> int:
    """Where the next chunk starts: about `overlap_tokens` before `cut`, snapped to a word."""
    if overlap_tokens == 0 or cut >= len(text):
        return cut
    at = _char_at(text, starts, max(0, bisect_right(starts, cut - 1) - overlap_tokens))
    if 0 < at < cut and not (text[at].isspace() or text[at - 1].isspace()):
        space = _SPACE.search(text, at, cut)
        at = space.start() if space else at
    return at if start < at < cut else cut


def _token_starts(ids: list[int]) -> list[int]:
    """Character offset where each token starts (a token that begins inside a character
    counts from that character), computed from byte lengths without per-byte Python loops."""
    enc = tokens.encoding()
    starts: list[int] = []
    chars = 0
    for piece in enc.decode_tokens_bytes(ids):
        starts.append(chars - (0x80 <= piece[0] < 0xC0) if chars else 0)
        chars += len(piece) if piece.isascii() else len(piece.translate(None, _CONTINUATION_BYTES))
    return starts


def _char_at(text: str, starts: list[int], token: int) -> int:
    return starts[token] if token < len(starts) else len(text)


def _skip_space(text: str, at: int) -> int:
    found = _NON_SPACE.search(text, at)
    return found.start() if found else len(text)
