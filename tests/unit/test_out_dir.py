"""`resolve_out_dir` (local folders exactly as before, bucket locations checked) and `publish_folder`
(each file one object, the index last, objects of an earlier version deleted), on fsspec's memory store."""

from __future__ import annotations

import secrets
from pathlib import Path

import fsspec
import pytest

from prefect_roboflow.blocks import InvalidInputError
from prefect_roboflow.flows._outputs.files import show_location
from prefect_roboflow.flows._run.parameters import resolve_out_dir
from prefect_roboflow.flows._storage import stores as _stores
from prefect_roboflow.flows._storage.publish import publish_folder, write_output


def test_a_local_out_dir_is_an_absolute_folder_created_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_out_dir("new/dir") == str(tmp_path / "new" / "dir") and (tmp_path / "new" / "dir").is_dir()
    assert resolve_out_dir(f"file://{tmp_path}/via-url") == str(tmp_path / "via-url")
    (tmp_path / "taken").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="exists and is not a folder") as caught:
        resolve_out_dir("taken")
    assert caught.value.field == "out_dir"


@pytest.mark.parametrize(
    ("out_dir", "reason"),
    [
        ("http://example.invalid/out/", "http:// URLs cannot be written to"),
        ("file://elsewhere/out/", "file:// URLs name this machine, not 'elsewhere'"),
        ("memory://user:secret@host/out/", "credentials in a memory:// URL are not accepted"),
        ("nosuch://bucket/out/", "unknown URL scheme 'nosuch'"),
    ],
)
def test_bad_out_dir_urls_name_the_parameter(out_dir: str, reason: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        resolve_out_dir(out_dir)
    assert caught.value.field == "out_dir" and caught.value.reason.startswith(reason)
    assert "secret" not in str(caught.value)


def test_publish_folder_uploads_each_file_whole_with_the_index_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = fsspec.filesystem("memory")
    url = f"memory://{secrets.token_hex(4)}/run/coco"
    assert resolve_out_dir(url) == url
    # given an earlier version with an image the new one drops
    memory.pipe_file(f"{url}/images/old.jpg", b"old image")
    memory.pipe_file(f"{url}/annotations.json", b"old index")
    folder = tmp_path / "coco"
    for name, data in {"images/a.jpg": b"a", "images/b.jpg": b"b", "annotations.json": b"new index"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    order: list[str] = []
    upload = _stores.FsspecStore.upload

    def recorded(self: _stores.FsspecStore, rel: str, file: object) -> None:
        order.append(rel.rsplit("/coco/", 1)[1])
        assert memory.cat_file(f"{url}/annotations.json") == b"old index"  # the old index until the last upload
        upload(self, rel, file)  # type: ignore[arg-type]

    monkeypatch.setattr(_stores.FsspecStore, "upload", recorded)
    # when the new version is published
    assert publish_folder(folder, url, index=["annotations.json"]) == 3
    # then the index went last, and the old image is gone once it did
    assert sorted(order[:2]) == ["images/a.jpg", "images/b.jpg"] and order[2] == "annotations.json"
    assert sorted(memory.find(url)) == sorted(
        f"{url.removeprefix('memory:/')}/{n}" for n in ("annotations.json", "images/a.jpg", "images/b.jpg")
    )
    assert memory.cat_file(f"{url}/annotations.json") == b"new index"


def test_write_output_and_summary_locations(tmp_path: Path) -> None:
    url = f"memory://{secrets.token_hex(4)}/run/a.jpg"
    write_output(url, b"jpeg")
    write_output(str(tmp_path / "sub" / "a.jpg"), b"jpeg")
    assert fsspec.filesystem("memory").cat_file(url) == (tmp_path / "sub" / "a.jpg").read_bytes() == b"jpeg"
    assert show_location(url) == f"`{url}`"
    assert (
        show_location("/data/run/gallery/index.html")
        == "[/data/run/gallery/index.html](file:///data/run/gallery/index.html)"
    )
