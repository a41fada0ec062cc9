"""Exact CLIP token counting, so over-long text prompts fail before a request is sent.

This is a faithful copy of the encode path of OpenAI CLIP's ``SimpleTokenizer``
(``clip/simple_tokenizer.py``, as shipped in the ``rf-clip`` package that a Roboflow
Inference server uses). The server tokenizes a prompt with ``clip.tokenize``, which
fails when ``[<|startoftext|>] + bpe(text) + [<|endoftext|>]`` is longer than the
77-token context. Every step that can change the count is kept as it is upstream:

* ``ftfy.fix_text``, then ``html.unescape`` twice, then ``strip()``;
* whitespace runs (as the ``regex`` package's ``\\s`` sees them) collapsed to one space;
* ``lower()``, then splitting with the same ``regex`` pattern;
* the GPT-2 byte-to-unicode map and the first 48,894 merges of the vocabulary file;
* the BPE cache pre-seeded with the two special tokens, so a prompt that contains
  ``<|startoftext|>`` or ``<|endoftext|>`` counts them as one token each, as upstream.

Only the token count is computed; token ids are never needed, so the 49,408-entry
encoder is not built. The vocabulary is read on first use, never at import time.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import regex

__all__ = ["CLIP_CONTEXT_LENGTH", "count_clip_tokens", "fits_clip_context"]

CLIP_CONTEXT_LENGTH = 77
"""Context length of every OpenAI CLIP text encoder, start and end tokens included."""

_VOCAB_PATH = Path(__file__).resolve().parent / "_data" / "bpe_simple_vocab_16e6.txt.gz"

# Upstream keeps lines 1..48894 of the file: 49152 ids minus 256 bytes minus the two
# special tokens; line 0 is a version header. The rest of the file is never used.
_N_MERGES = 49152 - 256 - 2

_SOT = "<|startoftext|>"
_EOT = "<|endoftext|>"

# Upstream's pattern, verbatim; split only to fit the line length.
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (never whitespace)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(word))


class _SimpleTokenizer:
    """The counting half of CLIP's ``SimpleTokenizer``."""

    def __init__(self, vocab_path: Path) -> None:
        # Imported here rather than at module level: ftfy alone costs tens of
        # milliseconds, and most imports of the package never count a token.
        import ftfy
        import regex

        self._fix_text = ftfy.fix_text
        self._whitespace = regex.compile(r"\s+")
        self._pat: regex.Pattern[str] = regex.compile(_PATTERN, regex.IGNORECASE)
        self._byte_encoder = _bytes_to_unicode()
        with gzip.open(vocab_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        self._bpe_ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        # Only the two seeded entries change results (they bypass BPE); the rest just saves
        # work on repeated words, so it is bounded for long-running workers fed varied text.
        self._seed = {_SOT: _SOT, _EOT: _EOT}
        self._cache: dict[str, str] = dict(self._seed)

    def _clean(self, text: str) -> str:
        text = self._fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        # regex's \s and str.strip() disagree on some characters (U+001C..U+001F),
        # so both steps are kept in upstream's order.
        text = self._whitespace.sub(" ", text).strip()
        return text.lower()

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        pairs = _get_pairs(word)
        if not pairs:
            # Upstream returns single-symbol tokens without caching them.
            return token + "</w>"
        ranks = self._bpe_ranks
        inf = float("inf")
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        result = " ".join(word)
        if len(self._cache) >= _MAX_CACHED_WORDS:
            self._cache = dict(self._seed)
        self._cache[token] = result
        return result

    def count(self, text: str) -> int:
        """Number of BPE tokens ``SimpleTokenizer.encode(text)`` would return."""
        encoder = self._byte_encoder
        total = 0
        for token in self._pat.findall(self._clean(text)):
            byte_token = "".join(encoder[b] for b in token.encode("utf-8"))
            # Byte-encoded symbols are never whitespace, so each space is a boundary.
            total += self._bpe(byte_token).count(" ") + 1
        return total


_MAX_CACHED_WORDS = 50_000


@functools.lru_cache(maxsize=1)
def _tokenizer() -> _SimpleTokenizer:
    return _SimpleTokenizer(_VOCAB_PATH)


def count_clip_tokens(text: str) -> int:
    """Count the BPE tokens CLIP's tokenizer makes of ``text``.

    The start and end tokens are not counted. The first call reads the vocabulary.

    Args:
        text: The prompt, exactly as it will be sent to the server.

    Returns:
        ``len(SimpleTokenizer().encode(text))`` of OpenAI CLIP.
    """
    return _tokenizer().count(text)


def fits_clip_context(text: str, context_length: int = CLIP_CONTEXT_LENGTH) -> bool:
    """Tell whether ``clip.tokenize(text, context_length)`` accepts ``text`` untruncated.

    Args:
        text: The prompt, exactly as it will be sent to the server.
        context_length: The text encoder's context, start and end tokens included.

    Returns:
        True when the text's tokens plus the start and end tokens fit the context.
    """
    return count_clip_tokens(text) + 2 <= context_length
