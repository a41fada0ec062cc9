"""Mistakes a new user makes in the shipped flows' parameters, as hypothesis strategies: counts,
ranges, empty values, reference example boxes, fan-out rates. Each flow has a correct call
(`good_parameters`) and, per parameter, a strategy of values that break its contract; a mistake
is one correct call with one parameter replaced."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

BOX = {"x": 160, "y": 120, "w": 80, "h": 80, "cls": "thing"}

# -- values outside a contract -------------------------------------------------------------------

not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
bools = st.booleans()
fractional = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda x: x != int(x))
#: Not a count (a whole number ≥ 1).
bad_counts = st.one_of(st.integers(max_value=0), bools, fractional, not_finite)
#: Not a share in [0, 1].
bad_fractions = st.one_of(
    st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
    st.floats(max_value=0.0, exclude_max=True, allow_infinity=False),
    not_finite,
    bools,
)
#: Not a cosine similarity in [-1, 1].
bad_similarities = st.one_of(
    st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
    st.floats(max_value=-1.0, exclude_max=True, allow_infinity=False),
    not_finite,
    bools,
)
blank = st.sampled_from(["", " ", "\t", "\n  "])
#: Label prompts that are no labels: none, a blank one, one twice.
bad_prompts = st.one_of(
    st.just([]),
    st.lists(blank, min_size=1, max_size=3),
    st.text(min_size=1, max_size=12).filter(str.strip).map(lambda p: [p, "a photo of a cat", p]),
)


def bad_examples(reference: str, off_image: bool = True) -> st.SearchStrategy[Any]:
    """Reference examples that cannot be sent: none, no boxes, a box of no size or no class,
    a class with only negative boxes, a blank image, and (``off_image``: found when the image is
    read) a box off its 320×240 image."""

    def one(**box: Any) -> list[dict[str, Any]]:
        return [{"image": reference, "boxes": [{**BOX, **box}]}]

    no_cls = {k: v for k, v in BOX.items() if k != "cls"}
    return st.one_of(
        st.just([]),
        st.just([{"image": reference, "boxes": []}]),
        st.floats(max_value=0.0).map(lambda w: one(w=w)),
        st.floats(max_value=0.0).map(lambda h: one(h=h)),
        not_finite.map(lambda x: one(x=x)),
        st.just(one(cls="")),
        st.just([{"image": reference, "boxes": [no_cls]}]),
        st.just(one(negative=True)),
        blank.map(lambda image: [{"image": image, "boxes": [BOX]}]),
        *([st.floats(min_value=321, max_value=1e6).map(lambda x: one(x=x)), st.just(one(y=-1.0))] if off_image else []),
    )


bad_classes = st.one_of(
    st.just([]),
    st.just({}),
    st.lists(blank, min_size=1, max_size=2),
    st.just(["a cat", "a cat"]),
    st.just({"cat": []}),
    st.just({"cat": ["a cat", " "]}),
    st.just({" ": "a cat"}),
)
bad_formats = st.one_of(st.just([]), st.just("coco"), st.lists(st.sampled_from(["voc", "csv", ""]), min_size=1))
bad_images = st.one_of(st.just([]), blank, st.lists(blank, min_size=1, max_size=2))
bad_fan_outs = st.one_of(
    st.integers(max_value=0).map(lambda n: {"shard_size": n}),
    fractional.map(lambda n: {"shard_size": n}),
    st.integers(max_value=-1).map(lambda n: {"shard_size": 10, "retries": n}),
    st.integers(min_value=11).map(lambda n: {"shard_size": 10, "retries": n}),
)
#: Not a frame rate (a number above 0, or None): a word, a bool, zero or less, not finite.
bad_rates = st.one_of(
    st.sampled_from(["fast", "30fps", ""]), bools, st.floats(max_value=0.0, allow_infinity=False), not_finite
)
bad_sample_modes = st.text(max_size=12).filter(lambda s: s not in {"fps", "keyframes", "scene"})
bad_families = st.text(max_size=12).filter(lambda s: s not in {"clip", "perception_encoder"})
bad_optional_text = blank


def mistakes(reference: str, off_image: bool = True) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    """Flow name → parameter → values that break that parameter's contract (``off_image``: with
    example boxes off their image, which only reading the image shows)."""
    batch = {
        "images": bad_images,
        "out_dir": blank,
        "model": bad_families,
        "version": bad_optional_text,
        "batch_size": bad_counts,
        "max_failure_rate": bad_fractions,
        "fan_out": bad_fan_outs,  # for the batch flows that fan out (see `of_flow`)
        "video_fps": bad_rates,
        "video_sample": bad_sample_modes,
    }
    detecting = {
        **batch,
        "examples": bad_examples(reference, off_image),
        "detector_version": bad_optional_text,
        "confidence": bad_fractions,
    }
    return {
        "embed_images": {**batch, "index_path": blank},
        "classify_images": {**batch, "labels": bad_prompts, "min_score": bad_similarities, "index_path": blank},
        "detect_crop_classify": {
            **detecting,
            "labels": bad_prompts,
            "padding": st.one_of(st.integers(max_value=-1), bools),
            "min_score": bad_similarities,
        },
        "auto_label": {
            **detecting,
            "classes": bad_classes,
            "formats": bad_formats,
            "min_score": bad_similarities,
            "min_probability": bad_fractions,
        },
        "find_duplicates": {
            "source": blank,
            "out_dir": blank,
            "threshold": st.one_of(
                st.floats(max_value=0.0, allow_infinity=False),
                st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
                not_finite,
                bools,
            ),
            "k": st.one_of(st.integers(max_value=0), st.integers(min_value=101), bools, fractional),
        },
        "search_images": {"query": blank, "embeddings_path": blank, "top_k": bad_counts},
    }


def of_flow(strategies: dict[str, Any], parameters: Iterable[str]) -> dict[str, Any]:
    """The strategies for the parameters a flow has."""
    names = set(parameters)
    return {name: strategy for name, strategy in strategies.items() if name in names}


def good_parameters(flow: str, images: str, reference: str, out_dir: Path, table: str) -> dict[str, Any]:
    """A correct call of a flow (its required parameters), writing to ``out_dir``."""
    examples = [{"image": reference, "boxes": [BOX]}]
    out = str(out_dir)
    return {
        "embed_images": {"images": images, "out_dir": out},
        "classify_images": {"images": images, "labels": ["a cat", "a dog"], "out_dir": out},
        "detect_crop_classify": {"images": images, "examples": examples, "labels": ["a", "b"], "out_dir": out},
        "auto_label": {"images": images, "examples": examples, "classes": ["a", "b"], "out_dir": out},
        "find_duplicates": {"source": table, "out_dir": out},
        "search_images": {"query": "a cat", "embeddings_path": table},
    }[flow]


def names_parameter(field: str, parameter: str) -> bool:
    """Whether an error's field is the parameter or a path inside it (``examples[0].boxes[0].w``)."""
    return field == parameter or field.startswith((f"{parameter}.", f"{parameter}["))
