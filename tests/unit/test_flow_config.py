"""What flows resolve from their parameters (cache, output folder, model family) and how they
write files — each a bug a user hit, pinned."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pytest
from prefect.filesystems import LocalFileSystem

from prefect_roboflow.blocks import (
    Clip,
    EmbeddingModel,
    InvalidInputError,
    OwlV2,
    PerceptionEncoder,
)
from prefect_roboflow.blocks._model import model_class, model_families
from prefect_roboflow.blocks._resize import RESIZE_REVISION
from prefect_roboflow.flows._outputs.files import ParquetSink
from prefect_roboflow.flows._run.parameters import ensure_out_dir
from prefect_roboflow.flows._steps.cache import ContentCache, content_key, resolve_cache
from prefect_roboflow.flows._steps.models import EmbeddingFamily, embedding_model
from prefect_roboflow.flows._storage.atomic import atomic_write_bytes


@pytest.fixture()
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_permissions_of_a_normal_write(tmp_path: Path, umask: None) -> None:
    atomic_write_bytes(tmp_path / "a.jpg", b"x")
    with ParquetSink(tmp_path / "t.parquet", pa.schema([("a", pa.int32())])) as sink:
        sink.write([{"a": 1}])
    (tmp_path / "plain").write_bytes(b"x")
    assert _mode(tmp_path / "a.jpg") == _mode(tmp_path / "t.parquet") == _mode(tmp_path / "plain") == 0o644
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "private.jpg", b"x")
    assert _mode(tmp_path / "private.jpg") == 0o600  # the umask decides, as for any write


@pytest.mark.parametrize("relative", ["cache", "cache/sub", "local-file-system/not-saved-here"])
def test_a_relative_folder_is_a_folder(relative: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-file-system" / "not-saved-here").mkdir(parents=True)  # an existing path wins over a slug
    cache = resolve_cache(relative)
    assert isinstance(cache.storage, Path) and cache.storage == (tmp_path / relative).resolve()
    cache.put("ab" * 32, b"value")
    assert cache.get("ab" * 32) == b"value"


def test_a_block_slug_of_a_registered_type_loads_the_block(tmp_path: Path) -> None:
    LocalFileSystem(basepath=str(tmp_path / "block-cache")).save("flow-config-test", overwrite=True)
    cache = resolve_cache("local-file-system/flow-config-test")
    assert isinstance(cache.storage, LocalFileSystem)
    cache.put("cd" * 32, b"value")
    assert cache.get("cd" * 32) == b"value" and any((tmp_path / "block-cache").rglob("cd" * 32))


def test_out_dir_naming_a_file_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(InvalidInputError, match="out_dir") as raised:
        ensure_out_dir(tmp_path / "taken")
    assert raised.value.field == "out_dir"
    assert ensure_out_dir(tmp_path / "new" / "dir").is_dir()


def test_one_name_per_model_family() -> None:
    assert (Clip.family, PerceptionEncoder.family, OwlV2.family) == ("clip", "perception_encoder", "owlv2")
    assert {name: cls.__name__ for name, cls in model_families().items()} == {
        "clip": "Clip",
        "perception_encoder": "PerceptionEncoder",
        "owlv2": "OwlV2",
    }
    embedding_families = {f for f, cls in model_families().items() if issubclass(cls, EmbeddingModel)}
    assert set(get_args(EmbeddingFamily)) == embedding_families  # the flows' `model` parameter
    assert Clip().label == "clip ViT-B-16" and PerceptionEncoder().label == "perception_encoder PE-Core-L14-336"
    assert model_class("owlv2") is OwlV2
    with pytest.raises(InvalidInputError, match="model"):
        embedding_model("owlv2", None, Clip().server)


def test_renaming_a_block_class_changes_no_cache_key() -> None:
    class RenamedClip(Clip):  # what a refactor that renames the class would leave
        _block_type_slug = "renamed-clip-for-a-test"  # not to take over the real block's registration

    before, after = Clip(version="ViT-L-14").identity(), RenamedClip(version="ViT-L-14").identity()
    assert before == after == {"family": "clip", "version": "ViT-L-14", "client_resize": RESIZE_REVISION}
    assert content_key("embed", "f" * 64, before, {}) == content_key("embed", "f" * 64, after, {})
    assert model_class("clip") is Clip  # the subclass did not take the family's name
    # what keys are made of: family and version, never the server or its key
    with_key = Clip(server={"api_url": "http://other:9001", "api_key": "secret-key-0123"}, version="ViT-L-14")
    assert (
        with_key.identity() == before
        and Clip(client_resize=False).identity()["client_resize"] == 0
        and "secret" not in content_key("embed", "f" * 64, with_key.identity(), {})
    )


def test_content_cache_treats_unreadable_entries_as_misses(tmp_path: Path) -> None:
    assert ContentCache(tmp_path / "fresh").get("00" * 32) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "entries.sqlite").mkdir()  # a folder where the cache's file should be
    assert ContentCache(tmp_path / "broken").get_many(["11" * 32, "00" * 32]) == {}


def test_a_storage_block_slug_is_known_before_its_collection_is_imported(tmp_path: Path) -> None:
    # given a fresh process, as a worker's flow-run process is, that has not imported prefect-aws
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from prefect_roboflow.flows._storage.locate import _is_block_slug\n"
        "assert 'prefect_aws' not in sys.modules\n"
        "print(_is_block_slug('s3-bucket/cache'), _is_block_slug('my-folder/cache'))\n"
    )
    # when it asks whether "s3-bucket/cache" names a saved block
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    # then it does (a local folder it is not), and an unknown type's slug is still a folder
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_a_table_is_written_in_row_groups_of_many_batches(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from prefect_roboflow.flows._storage.parquet import ROW_GROUP_ROWS

    schema = pa.schema([("i", pa.int64()), ("v", pa.list_(pa.float32()))])
    path = tmp_path / "t.parquet"
    batches = [[{"i": b * 64 + r, "v": [float(r)] * 4} for r in range(64)] for b in range(40)]  # 2,560 rows
    with ParquetSink(path, schema) as sink:
        for rows in batches:
            sink.write(rows)
        assert not path.exists() and sink.rows == 2560  # nothing at the final name before the commit
    table = pq.ParquetFile(path)
    sizes = [table.metadata.row_group(g).num_rows for g in range(table.num_row_groups)]
    assert sum(sizes) == 2560 and all(n >= ROW_GROUP_ROWS for n in sizes[:-1]) and len(sizes) < 40
    assert table.read().column("i").to_pylist() == list(range(2560))  # in order, none lost or doubled
    with pytest.raises(RuntimeError), ParquetSink(tmp_path / "aborted.parquet", schema) as sink:
        sink.write(batches[0])
        raise RuntimeError("a crash mid-run")
    assert not (tmp_path / "aborted.parquet").exists() and not list(tmp_path.glob(".aborted*"))
