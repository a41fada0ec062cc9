"""Asset keys: one per storage location, each a key Prefect takes (its own validator is the oracle).

A location with characters Prefect refuses gets them replaced and a hash of the location appended,
so two locations never share a key (``/data/run 1/x`` and ``/data/run_1/x`` did)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from prefect.assets import Asset

from prefect_roboflow.flows._outputs.assets import MAX_KEY_LENGTH, asset_key

#: Path characters, those Prefect refuses included.
CHARS = st.sampled_from([*"ab_-./ ~#?&%\"'<>[]{}|\té"])
PATHS = st.text(CHARS, min_size=1, max_size=40).map(lambda p: "s3://bucket/" + p.strip("/") + "/x")


def test_a_replaced_character_adds_the_location_s_hash() -> None:
    spaced, underscored = asset_key("/data/run 1/x"), asset_key("/data/run_1/x")
    assert underscored == "file:///data/run_1/x"  # nothing replaced: the location itself
    digest = hashlib.sha256(b"file:///data/run 1/x").hexdigest()[:12]
    assert spaced == f"file:///data/run_1/x~{digest}" != underscored


@given(st.lists(PATHS, min_size=2, max_size=2, unique=True))
def test_different_locations_get_different_keys_prefect_accepts(locations: list[str]) -> None:
    keys = [asset_key(location) for location in locations]
    assert keys[0] != keys[1]
    for key in keys:
        assert Asset(key=key).key == key


@given(st.text(CHARS, min_size=600, max_size=700))
def test_long_locations_are_cut_to_distinct_valid_keys(tail: str) -> None:
    a, b = asset_key("s3://bucket/" + tail + "a"), asset_key("s3://bucket/" + tail + "b")
    assert len(a) <= MAX_KEY_LENGTH and len(b) <= MAX_KEY_LENGTH and a != b
    assert Asset(key=a).key == a
