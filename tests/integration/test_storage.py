"""Object storage in and out (flows/_storage/) against moto on loopback.

moto is a real S3-compatible server. Sources are listed lazily (one page of keys at a time), read in
whichever process runs the task, written whole; bad sources are typed errors naming the parameter;
credentials never show.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import pickle
import secrets
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.images import make_image
from support.s3 import SECRET_KEY, MotoBucket, s3, s3_server, saved_bucket_block  # noqa: F401

from prefect_roboflow.blocks.exceptions import InvalidImageError, InvalidInputError
from prefect_roboflow.flows._storage import locate as _locate
from prefect_roboflow.flows._storage.access import check_output, join, read_bytes, write_bytes
from prefect_roboflow.flows._storage.listing import block_source, count_refs, iter_refs
from prefect_roboflow.flows._storage.parquet import AtomicParquetWriter

JPEG = make_image(1, fmt="JPEG")
PNG = make_image(2, fmt="PNG")
SCHEMA = pa.schema([("image_ref", pa.string()), ("score", pa.float32())])


def _tree(s3: MotoBucket) -> None:  # noqa: F811
    s3.put_many(
        [
            ("photos/a.jpg", JPEG),
            ("photos/b.PNG", PNG),
            ("photos/notes.txt", b"not an image"),
            ("photos/sub/c.jpg", JPEG),
            ("photos/sub/deeper/d.jpg", JPEG),
            ("photos-2/e.jpg", JPEG),
            ("other/f.jpg", JPEG),
        ]
    )


def test_a_prefix_lists_the_images_directly_under_it(s3: MotoBucket) -> None:  # noqa: F811
    _tree(s3)
    expected = [f"s3://{s3.bucket}/photos/a.jpg", f"s3://{s3.bucket}/photos/b.PNG"]
    assert list(iter_refs(f"s3://{s3.bucket}/photos/")) == expected
    assert list(iter_refs(f"s3://{s3.bucket}/photos")) == expected  # a prefix named without its slash
    assert count_refs(f"s3://{s3.bucket}/photos/") == 2


def test_globs_match_keys_and_double_star_descends(s3: MotoBucket) -> None:  # noqa: F811
    _tree(s3)
    base = f"s3://{s3.bucket}/"
    assert list(iter_refs(f"{base}photos/**/*.jpg")) == [
        f"{base}photos/a.jpg",
        f"{base}photos/sub/c.jpg",
        f"{base}photos/sub/deeper/d.jpg",
    ]
    assert list(iter_refs(f"{base}photos/*.jpg")) == [f"{base}photos/a.jpg"]
    # key order, as S3 lists: "-" sorts before "/"
    assert list(iter_refs(f"{base}*/*.jpg")) == [f"{base}other/f.jpg", f"{base}photos-2/e.jpg", f"{base}photos/a.jpg"]
    # a list mixes sources: expanded prefixes, single objects, https URLs (passed through unread)
    mixed = [f"{base}photos/", f"{base}other/f.jpg", "https://example.org/x.jpg"]
    assert list(iter_refs(mixed)) == [f"{base}photos/a.jpg", f"{base}photos/b.PNG", f"{base}other/f.jpg", mixed[2]]


def test_listing_streams_pages_instead_of_listing_everything_first(s3: MotoBucket) -> None:  # noqa: F811
    # given 2,500 keys, listed 100 per request
    s3.put_many((f"many/{i:05d}.jpg", b"x") for i in range(2500))
    calls: list[str] = []
    client = _locate._s3_client(None, "images")
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: calls.append("list"))
    refs = iter_refs(f"s3://{s3.bucket}/many/", page_size=100)
    # when the first reference is taken, one page has been requested
    assert next(refs) == f"s3://{s3.bucket}/many/00000.jpg"
    assert len(calls) == 1
    # when the first page is used up, the second is requested, and so on
    assert sum(1 for _ in zip(range(99), refs, strict=False)) == 99
    assert len(calls) == 1
    next(refs)
    assert len(calls) == 2
    # then all of them come, in key order, 25 requests in all
    rest = list(refs)
    assert len(rest) == 2500 - 101 and rest[-1] == f"s3://{s3.bucket}/many/02499.jpg"
    assert len(calls) == 25
    assert count_refs(f"s3://{s3.bucket}/many/", page_size=1000) == 2500


def _read_in_child(ref: str) -> tuple[int, str, bytes]:
    from prefect_roboflow.flows._storage.access import read_bytes

    return os.getpid(), ref, read_bytes(ref)


def test_a_task_process_reads_the_bytes_from_a_plain_string_reference(s3: MotoBucket) -> None:  # noqa: F811
    _tree(s3)
    ref = next(iter_refs(f"s3://{s3.bucket}/photos/"))
    assert type(ref) is str and pickle.loads(pickle.dumps(ref)) == ref
    assert read_bytes(ref) == JPEG
    # a fresh process (spawned: nothing inherited but the environment) makes its own client
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pid, echoed, data = pool.submit(_read_in_child, ref).result(timeout=120)
    assert pid != os.getpid() and echoed == ref and data == JPEG


def test_a_key_deleted_after_listing_fails_that_item_only(s3: MotoBucket) -> None:  # noqa: F811
    _tree(s3)
    refs = list(iter_refs(f"s3://{s3.bucket}/photos/"))
    s3.delete("photos/a.jpg")
    with pytest.raises(InvalidImageError) as caught:
        read_bytes(refs[0])
    assert caught.value.field == "image"
    assert caught.value.reason == f"not found: {refs[0]}"
    assert read_bytes(refs[1]) == PNG


def _saved_bucket_block(s3: MotoBucket, folder: str, secret: str = SECRET_KEY) -> Any:  # noqa: F811
    return saved_bucket_block(s3.endpoint, s3.bucket, folder=folder, secret=secret)


def test_a_saved_s3_bucket_block_plus_a_path(s3: MotoBucket, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # given a saved S3Bucket block on the photos/ folder, and no AWS configuration in the environment
    _tree(s3)
    block = _saved_bucket_block(s3, "photos")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    source = block_source(block)
    assert source == f"block://s3-bucket/{block._block_document_name}/"
    # when it is listed, globbed and read, through the block's own credentials
    refs = list(iter_refs(source))
    assert refs == [f"{source}a.jpg", f"{source}b.PNG"]
    assert list(iter_refs((block, "sub/**/*.jpg"))) == [f"{source}sub/c.jpg", f"{source}sub/deeper/d.jpg"]
    assert read_bytes(refs[1]) == PNG
    # and written to: keys land under the block's folder
    write_bytes(join(source, "out/copy.png"), PNG)
    assert s3.get("photos/out/copy.png") == PNG
    # and its credentials block alone serves plain s3:// URLs
    url_refs = list(iter_refs(f"s3://{s3.bucket}/photos/", credentials=block.credentials))
    assert url_refs == [f"s3://{s3.bucket}/photos/a.jpg", f"s3://{s3.bucket}/photos/b.PNG"]
    assert read_bytes(url_refs[0], credentials=block.credentials) == JPEG
    with pytest.raises(InvalidInputError, match="no AWS credentials found"):
        list(iter_refs(f"s3://{s3.bucket}/photos/"))  # without it, the environment has none


def test_parquet_written_to_a_bucket_appears_whole_and_reads_from_there(s3: MotoBucket) -> None:  # noqa: F811
    url = f"s3://{s3.bucket}/out/table.parquet"
    check_output(f"s3://{s3.bucket}/out/")
    # given a table written in two batches
    with AtomicParquetWriter(url, SCHEMA) as sink:
        sink.write([{"image_ref": "a.jpg", "score": 0.5}])
        sink.write([{"image_ref": f"{i}.jpg", "score": float(i)} for i in range(999)])
        # then nothing is visible until it is committed
        assert s3.keys("out/") == []
    assert sink.rows == 1000
    # and then one whole parquet object, readable by pandas (s3fs) and pyarrow straight from the bucket
    frame = pd.read_parquet(url)
    assert len(frame) == 1000 and frame["image_ref"].iloc[0] == "a.jpg"
    assert pq.read_table(io.BytesIO(s3.get("out/table.parquet"))).equals(pa.Table.from_pandas(frame, SCHEMA))
    import fsspec

    table = pq.read_table(url.removeprefix("s3://"), filesystem=fsspec.filesystem("s3"))
    assert table.num_rows == 1000
    # and by duckdb, through the same fsspec file system
    import duckdb

    connection = duckdb.connect()
    connection.register_filesystem(fsspec.filesystem("s3"))
    assert connection.sql(f"select count(*), max(score) from read_parquet('{url}')").fetchall() == [(1000, 998.0)]


def test_a_failed_parquet_write_leaves_the_previous_object(s3: MotoBucket) -> None:  # noqa: F811
    url = s3.put("out/table.parquet", b"previous")
    with pytest.raises(RuntimeError, match="crash"), AtomicParquetWriter(url, SCHEMA) as sink:
        sink.write([{"image_ref": "a.jpg", "score": 0.5}])
        raise RuntimeError("crash")
    assert s3.get("out/table.parquet") == b"previous"


def test_a_large_parquet_table_goes_up_as_one_multipart_object(s3: MotoBucket) -> None:  # noqa: F811
    # given a table over boto3's 8 MiB multipart threshold
    schema = pa.schema([("blob", pa.binary())])
    url = f"s3://{s3.bucket}/out/big.parquet"
    parts: list[str] = []
    client = _locate._s3_client(None, "out_dir")
    client.meta.events.register("before-call.s3.UploadPart", lambda **_: parts.append("part"))
    with AtomicParquetWriter(url, schema) as sink:
        sink.write([{"blob": os.urandom(1 << 20)} for _ in range(12)])
    # then it was uploaded in parts, and readers see it whole
    assert len(parts) >= 2
    assert pq.read_table(io.BytesIO(s3.get("out/big.parquet"))).num_rows == 12


def test_local_outputs_are_atomic_with_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_bytes(str(tmp_path / "out" / "a.png"), PNG)
        with AtomicParquetWriter(tmp_path / "out" / "t.parquet", SCHEMA) as sink:
            sink.write([{"image_ref": "a.jpg", "score": 1.0}])
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "a.png").read_bytes() == PNG
    assert pq.read_table(tmp_path / "out" / "t.parquet").num_rows == 1
    for name in ("a.png", "t.parquet"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "t.parquet"]  # no temp files left


def test_local_and_other_fsspec_sources_list_in_key_order(tmp_path: Path) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"/{secrets.token_hex(4)}"
    for name in ("a.jpg", "a/b.jpg", "a-b.jpg", "z.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(JPEG)
        memory.pipe_file(f"{root}/{name}", JPEG)
    assert list(iter_refs(f"{tmp_path}/**/*.jpg")) == [f"{tmp_path}/{n}" for n in ("a-b.jpg", "a.jpg", "a/b.jpg")]
    assert list(iter_refs(str(tmp_path))) == [f"{tmp_path}/a-b.jpg", f"{tmp_path}/a.jpg"]
    assert list(iter_refs(f"file://{tmp_path}/")) == [f"file://{tmp_path}/a-b.jpg", f"file://{tmp_path}/a.jpg"]
    refs = list(iter_refs(f"memory://{root}/**/*.jpg"))
    assert refs == [f"memory://{root}/{n}" for n in ("a-b.jpg", "a.jpg", "a/b.jpg")]
    assert read_bytes(refs[2]) == JPEG and read_bytes(f"file://{tmp_path}/a/b.jpg") == JPEG
    assert list(iter_refs([str(tmp_path / "missing.jpg")])) == [str(tmp_path / "missing.jpg")]  # a failed row later


@pytest.mark.parametrize(
    ("source", "field", "reason"),
    [
        ("s3://no-such-bucket-{token}/photos/", "images", "bucket 'no-such-bucket-{token}' does not exist"),
        ("s3://{bucket}/empty/", "images", "no image files found in s3://{bucket}/empty/"),
        ("s3://{bucket}/nothing.jpg", "images", "nothing found at s3://{bucket}/nothing.jpg"),
        ("foo://bucket/photos/", "images", "unknown URL scheme 'foo'"),
        ("gs://bucket/photos/", "images", "gs:// is not available here: Please install gcsfs"),
        (["a.jpg", "s3://key:hunter2@{bucket}/a.jpg"], "images[1]", "credentials in a s3:// URL are not accepted"),
        ("block://s3-bucket/no-such-block-{token}/", "images", "no saved block s3-bucket/no-such-block-{token}"),
        ("block://S3 Bucket/x/", "images", "expected block://<block-type-slug>/<block-name>/<path>"),
        ("s3://{bucket}/photos/a**b/*.jpg", "images", "bad pattern"),
    ],
)
def test_bad_sources_are_typed_errors_naming_the_parameter(
    s3: MotoBucket,  # noqa: F811
    source: str | list[str],
    field: str,
    reason: str,
) -> None:
    s3.put("empty/readme.txt", b"no images here")
    token = secrets.token_hex(3)

    def fill(text: str) -> str:
        return text.format(bucket=s3.bucket, token=token)

    source = [fill(s) for s in source] if isinstance(source, list) else fill(source)
    with pytest.raises(InvalidInputError) as caught:
        list(iter_refs(source))
    assert caught.value.field == field
    assert caught.value.reason.startswith(fill(reason)), caught.value.reason
    assert "hunter2" not in str(caught.value)


def test_missing_credentials_and_missing_output_bucket(s3: MotoBucket, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    with pytest.raises(InvalidInputError, match="does not exist") as caught:
        check_output("s3://no-such-bucket-out/run/")
    assert caught.value.field == "out_dir"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(InvalidInputError, match="no AWS credentials found") as caught:
        list(iter_refs(f"s3://{s3.bucket}/photos/"))
    assert caught.value.field == "images"
    with pytest.raises(InvalidInputError, match="no AWS credentials found") as caught:
        check_output(f"s3://{s3.bucket}/run/", field="out_dir")
    assert caught.value.field == "out_dir"


def test_an_unsaved_block_cannot_be_a_source(s3: MotoBucket) -> None:  # noqa: F811
    from prefect_aws import S3Bucket

    with pytest.raises(InvalidInputError, match="must be saved") as caught:
        list(iter_refs((S3Bucket(bucket_name=s3.bucket), "photos/")))
    assert caught.value.field == "images"


def test_credentials_never_appear_in_logs_references_or_errors(
    s3: MotoBucket,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given secret keys that moto accepts, in the environment and in a saved block
    sentinel = f"SENTINEL{secrets.token_hex(8)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)
    _locate._CLIENTS.clear()
    _tree(s3)
    block = _saved_bucket_block(s3, "photos", secret=sentinel + "block")
    caplog.set_level(logging.DEBUG)  # botocore's own debug logging included
    seen: list[str] = []
    # when everything is used: listing, reading, writing, failing
    for source in (f"s3://{s3.bucket}/photos/", block_source(block), (block, "sub/**/*.jpg")):
        for ref in iter_refs(source):
            seen.append(ref)
            read_bytes(ref)
    write_bytes(f"s3://{s3.bucket}/out/x.png", PNG)
    with AtomicParquetWriter(f"s3://{s3.bucket}/out/t.parquet", SCHEMA) as sink:
        sink.write([{"image_ref": seen[0], "score": 1.0}])
    for bad in (f"s3://no-such-{secrets.token_hex(3)}/p/", f"s3://AKIA:{sentinel}@{s3.bucket}/p/"):
        with pytest.raises(InvalidInputError) as caught:
            list(iter_refs(bad))
        seen += [str(caught.value), repr(caught.value)]
    s3.delete("photos/a.jpg")
    with pytest.raises(InvalidImageError) as missing:
        read_bytes(seen[0])
    seen += [str(missing.value), repr(block), str(block)]
    # then the secret shows nowhere
    assert caplog.records, "expected botocore debug logs to check"
    assert sentinel not in caplog.text
    assert not [text for text in seen if sentinel in text]
