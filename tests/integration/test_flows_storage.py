"""The flows read their images from an S3-compatible server (moto, on loopback): a prefix, a glob and
a saved S3Bucket block, each image read and hashed inside the task that sends it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.fault_proxy import FaultProxy
from support.images import make_image
from support.s3 import MotoBucket, s3, s3_server  # noqa: F401

from prefect_roboflow.blocks import Clip, InferenceServer, InvalidInputError
from prefect_roboflow.flows import embed_images

pytestmark = pytest.mark.server


def _upload(s3: MotoBucket) -> dict[str, bytes]:  # noqa: F811
    images = {
        f"photos/img_{i:02d}.{'png' if i % 2 else 'jpg'}": make_image(900 + i, fmt="PNG" if i % 2 else "JPEG")
        for i in range(10)
    }
    images["photos/2024/deep.png"] = make_image(950)
    images["photos/notes.txt"] = b"not an image"
    s3.put_many(images.items())
    return images


def test_embed_images_from_a_bucket_prefix_glob_and_block(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    inference_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = _upload(s3)
    cache = str(tmp_path / "cache")
    prefix = embed_images(f"{s3.url}photos/", str(tmp_path / "prefix"), server=proxy.url, cache_storage=cache)
    rows = pq.read_table(prefix.embeddings_path).to_pylist()
    direct = sorted(k for k in images if k.count("/") == 1 and not k.endswith(".txt"))
    assert [r["image_ref"] for r in rows] == [f"{s3.url}{k}" for k in direct]  # the prefix, not its sub-folders
    assert prefix.succeeded == 10 and proxy.count("/clip/embed_image") == 10
    local = Clip(server=InferenceServer(api_url=inference_url)).embed_images([images[k] for k in direct[:3]])
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows[:3]]), local, rtol=1e-5, atol=1e-5)

    proxy.clear()
    glob = embed_images(f"{s3.url}photos/**/*.png", str(tmp_path / "glob"), server=proxy.url, cache_storage=cache)
    refs = [r["image_ref"] for r in pq.read_table(glob.embeddings_path).to_pylist()]
    assert refs == sorted(f"{s3.url}{k}" for k in images if k.endswith(".png"))
    assert proxy.count() == 1  # only the deep image is new: the rest come from the content cache

    from prefect_aws import AwsCredentials, S3Bucket

    S3Bucket(bucket_name=s3.bucket, credentials=AwsCredentials()).save("flows-storage-test", overwrite=True)
    proxy.clear()
    block = embed_images(
        "block://s3-bucket/flows-storage-test/photos/", str(tmp_path / "block"), server=proxy.url, cache_storage=cache
    )
    assert block.succeeded == 10 and proxy.count() == 0

    # a key listed in a list of sources but gone when read: that image's failed row, the rest complete
    listed = [f"{s3.url}{direct[0]}", f"{s3.url}photos/gone.jpg"]
    partial = embed_images(listed, str(tmp_path / "partial"), server=proxy.url, cache_storage=cache, max_failure_rate=1)
    failed = [r for r in pq.read_table(partial.embeddings_path).to_pylist() if r["status"] == "failed"]
    assert [(r["image_ref"], "not found" in r["error"]) for r in failed] == [(f"{s3.url}photos/gone.jpg", True)]


def test_a_bucket_that_does_not_exist_fails_before_any_request(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    with pytest.raises(InvalidInputError, match="images"):
        embed_images("s3://no-such-bucket-here/photos/", str(tmp_path / "out"), server=proxy.url)
    with pytest.raises(InvalidInputError, match="images"):
        embed_images(f"{s3.url}empty-prefix/", str(tmp_path / "out"), server=proxy.url)
    assert proxy.count() == 0


def test_a_run_lists_its_bucket_source_once(
    s3: MotoBucket,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the run counts its images (for progress and batch labels) and reads them back from one listing
    from prefect_roboflow.flows._storage.stores import S3Store

    images = _upload(s3)
    listings: list[str] = []
    real_list = S3Store.list

    def counted(self: S3Store, folder: str, recursive: bool, page_size: int):  # type: ignore[no-untyped-def]
        listings.append(folder)
        return real_list(self, folder, recursive, page_size)

    monkeypatch.setattr(S3Store, "list", counted)
    result = embed_images(
        f"{s3.url}photos/", str(tmp_path / "out"), server=proxy.url, cache_storage=str(tmp_path / "cache"), batch_size=2
    )
    direct = [k for k in images if k.count("/") == 1 and not k.endswith(".txt")]
    assert (result.images, result.succeeded) == (len(direct), len(direct))
    assert listings == ["photos/"]
