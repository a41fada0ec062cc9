"""Fan-out pieces that need no work pool: a shard run on its own, and the fan-out's bad input.

The whole fan-out (a deployment on a process pool with two workers, on PostgreSQL, S3 to S3) is
tested end to end in ``tests/e2e/test_scale_out_e2e.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.exceptions import ParameterTypeError
from support.fault_proxy import FaultProxy

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows import embed_images

pytestmark = pytest.mark.server


def test_a_shard_run_embeds_its_manifest_into_its_part(
    proxy: FaultProxy, image_paths: list[Path], tmp_path: Path
) -> None:
    # given a manifest of three images, as the parent run writes it
    manifest = tmp_path / "out" / "_shards" / "part-00002.json"
    manifest.parent.mkdir(parents=True)
    refs = [str(p) for p in image_paths[:3]]
    manifest.write_text(json.dumps(refs))
    shard = {"index": 2, "manifest": str(manifest), "attempt": 1}
    # when a run of the flow is given that shard (the images parameter is not what it reads)
    result = embed_images(
        str(image_paths[5]), str(tmp_path / "out"), server=proxy.url, cache_storage=str(tmp_path / "cache"), shard=shard
    )
    # then its part of the dataset folder holds exactly the manifest's images, and its counts are kept
    part = tmp_path / "out" / "embeddings" / "part-00002.parquet"
    assert result.embeddings_path == str(part)
    assert [r["image_ref"] for r in pq.read_table(part).to_pylist()] == refs
    saved = json.loads((tmp_path / "out" / "_shards" / "part-00002.result.json").read_text())
    assert (saved["images"], saved["succeeded"], saved["failed"]) == (3, 3, 0)
    assert proxy.count("/clip/embed_image") >= 1


@pytest.mark.parametrize(
    ("fan_out", "reason"),
    [
        ({"shard_size": 10}, "run this flow from one"),
        ({"shard_size": 10, "deployment": "embed-images/no-such-deployment"}, "no deployment named"),
    ],
)
def test_a_fan_out_with_no_deployment_to_run_on_fails_before_any_request(
    fan_out: dict[str, object], reason: str, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    # when a fan-out is asked of a run that has no deployment (a plain call), or names a missing one
    with pytest.raises(InvalidInputError) as caught:
        embed_images(str(image_dir), str(tmp_path / "out"), server=proxy.url, fan_out=fan_out)
    # then a typed error names the parameter, and nothing was listed into manifests or sent
    assert caught.value.field == "fan_out" and reason in caught.value.reason
    assert proxy.count() == 0
    assert not (tmp_path / "out" / "_shards").exists()


def test_a_shard_size_below_one_is_refused_before_the_run(proxy: FaultProxy, image_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ParameterTypeError, match="shard_size"):
        embed_images(str(image_dir), str(tmp_path / "out"), server=proxy.url, fan_out={"shard_size": 0})
    assert proxy.count() == 0
