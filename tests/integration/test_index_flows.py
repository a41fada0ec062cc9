"""The embedding flows keep a vector index (``index_path``) and `search_images` answers from it:
rows added once, the same hits as the table, another model's index refused before any request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.fault_proxy import FaultProxy
from support.images import make_image

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import VectorIndex, classify_images, embed_images, search_images

pytestmark = pytest.mark.server


def test_embed_images_keeps_an_index_that_search_images_uses(
    proxy: FaultProxy, inference_url: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"p{i:02d}.png").write_bytes(make_image(1500 + i))
    index, cache = str(tmp_path / "index"), str(tmp_path / "cache")
    kwargs = {"server": proxy.url, "cache_storage": cache, "index_path": index}

    first = embed_images(str(photos), str(tmp_path / "out"), **kwargs)
    assert first.indexed == 12 and VectorIndex.open(index).rows == 12
    for i in range(3):
        (photos / f"new{i}.png").write_bytes(make_image(1600 + i))
    again = embed_images(str(photos), str(tmp_path / "out"), **kwargs)
    assert again.indexed == 3 and VectorIndex.open(index).rows == 15  # a superset adds only the new rows

    from_table = search_images("a photo of a box", again.embeddings_path, top_k=5, server=inference_url)
    from_index = search_images("a photo of a box", index, top_k=5, server=inference_url)
    assert from_index.model == from_table.model == "clip ViT-B-16" and from_index.searched_rows == 15
    assert [h.image_ref for h in from_index.hits] == [h.image_ref for h in from_table.hits]
    np.testing.assert_allclose([h.score for h in from_index.hits], [h.score for h in from_table.hits], atol=1e-5)

    proxy.clear()
    with pytest.raises(InvalidInputError, match="index_path") as refused:
        classify_images(str(photos), ["a box"], str(tmp_path / "pe"), model="perception_encoder", **kwargs)
    assert "clip ViT-B-16" in str(refused.value) and proxy.count() == 0
