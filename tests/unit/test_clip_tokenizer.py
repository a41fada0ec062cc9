"""Tests for the exact CLIP token counter.

Every expected count below was produced by the real tokenizer the server uses:
``len(clip.clip._tokenizer.encode(text))`` from ``rf-clip`` 1.1 (OpenAI CLIP's
``SimpleTokenizer``), with ftfy 6.3.1 and regex 2026.11.15, and every ``fits``
by whether ``clip.tokenize(text)`` raised its "too long for context length" error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prefect_roboflow.blocks._clip_tokenizer import (
    CLIP_CONTEXT_LENGTH,
    count_clip_tokens,
    fits_clip_context,
)

_PHRASE = "photo of a red car parked near the old brick house "
_AT_75 = "a " + _PHRASE * 6 + "with a cat and a dog sitting nearby"
_AT_76 = _AT_75 + " today"
_VERY_LONG = "a high resolution photograph of a small tabby cat sleeping on a couch " * 60

# (text, tokens without start/end, accepted by clip.tokenize at 77)
CASES: dict[str, tuple[str, int, bool]] = {
    "empty": ("", 0, True),
    "whitespace_only": (" \t\n\u3000 ", 0, True),
    "plain_english": ("a photo of a cat", 5, True),
    "mixed_case": ("A Photo Of A CAT", 5, True),
    "sentence": ("A golden retriever puppy playing fetch on a sunny beach at sunset.", 13, True),
    "punctuation": (
        "Hello, world! How's it going?! (fine...) -- [ok] {yes}; 'quoted' \"double\"",
        26,
        True,
    ),
    "contractions": ("I'M sure they'll say we've done what you'd've done, don't you?", 19, True),
    "numbers": ("The year 2024 had 365 days; pi is 3.14159 and 1,000,000 is large.", 34, True),
    "digits_only": ("1234567890", 10, True),
    "emoji": ("a dog 🐶 wearing sunglasses 😎 on a skateboard 🛹", 11, True),
    "emoji_zwj": ("👨‍👩‍👧‍👦 family 🏳️‍🌈 flag 🇺🇸", 10, True),
    "chinese": ("一只猫坐在垫子上", 19, True),
    "arabic": ("قطة تجلس على السجادة", 18, True),
    "russian_japanese_korean": ("кошка ねこ 고양이", 15, True),
    "html_entities": ("Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; caf&eacute; &#39;hi&#39;", 14, True),
    "html_double_escaped": ("fish &amp;amp; chips &amp;lt;3", 5, True),
    "mojibake": ("cafÃ© dÃ©jÃ  vu", 5, True),
    "mixed_whitespace": (" \t a\n\nphoto \u00a0 of\u3000a   cat \r\n", 5, True),
    "special_tokens": ("<|startoftext|>a cat<|ENDOFTEXT|>", 4, True),
    "url": ("https://example.com/images?id=42&size=large", 16, True),
    "at_75": (_AT_75, 75, True),
    "at_76": (_AT_76, 76, False),
    "very_long": (_VERY_LONG, 780, False),
}


@pytest.mark.parametrize(("text", "expected", "fits"), CASES.values(), ids=CASES.keys())
def test_count_matches_rf_clip(text: str, expected: int, fits: bool) -> None:
    assert count_clip_tokens(text) == expected
    assert fits_clip_context(text) is fits


@pytest.mark.parametrize(("text", "expected", "fits"), CASES.values(), ids=CASES.keys())
def test_count_is_stable_once_cached(text: str, expected: int, fits: bool) -> None:
    # The second call goes through the BPE cache filled by the first.
    assert count_clip_tokens(text) == count_clip_tokens(text) == expected


def test_context_length_counts_start_and_end_tokens() -> None:
    assert CLIP_CONTEXT_LENGTH == 77
    assert fits_clip_context(_AT_75, context_length=77)
    assert not fits_clip_context(_AT_75, context_length=76)
    assert fits_clip_context(_AT_76, context_length=78)
    assert fits_clip_context("", context_length=2)
    assert not fits_clip_context("cat", context_length=2)


def test_vocabulary_and_license_ship_beside_the_module() -> None:
    import prefect_roboflow.blocks._clip_tokenizer as module

    data = Path(module.__file__).resolve().parent / "_data"
    assert (data / "bpe_simple_vocab_16e6.txt.gz").stat().st_size == 1_356_917
    assert "Copyright (c) 2021 OpenAI" in (data / "LICENSE-CLIP.txt").read_text()


def test_import_does_not_load_the_vocabulary() -> None:
    # A fresh interpreter, since this process has long since loaded it.
    code = (
        "import sys\n"
        "import prefect_roboflow.blocks._clip_tokenizer as m\n"
        "assert m._tokenizer.cache_info().currsize == 0\n"
        "assert 'ftfy' not in sys.modules\n"
        "assert m.count_clip_tokens('a cat') == 2\n"
        "assert m._tokenizer.cache_info().currsize == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
