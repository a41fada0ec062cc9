"""Publishing outputs whole: one file or object, or a folder built locally with its index last.

`write_output` writes one output (a local path or a URL) so that a reader sees the old one or the
new one; `publish_folder` uploads a finished local folder (a COCO or YOLO dataset) file by file
under a prefix, its index files last, and then deletes what an earlier run left there.

Examples:
    ```python
    write_output(join(out, "annotated/a-0f3c.jpg"), jpeg)  # out: "/data/run" or "s3://results/run/"
    publish_folder(Path("build/coco"), "s3://results/run/coco", index=["annotations.json"])
    ```
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .access import is_remote, write_bytes
from .atomic import atomic_write_bytes
from .locate import locate
from .stores import LIST_PAGE_SIZE, Store, output_error

__all__ = ["UPLOAD_CONCURRENCY", "publish_folder", "write_output"]

#: Objects uploaded at once when a folder is published.
UPLOAD_CONCURRENCY = 8


def write_output(url: str, data: bytes) -> None:
    """Write one output file (a local path) or object (a URL) whole: readers see the old or the new one.

    Examples:
        ```python
        write_output(join(out, "annotated/a-0f3c.jpg"), jpeg)  # out: "/data/run" or "s3://results/run/"
        ```
    """
    if is_remote(url):
        write_bytes(url, data)
    else:
        atomic_write_bytes(Path(url), data)


def publish_folder(folder: Path, url: str, index: Sequence[str] = ()) -> int:
    """Upload the files of a local folder under the prefix ``url``, each as one whole object.

    The ``index`` files (paths relative to ``folder``, e.g. ``annotations.json``) go up last, once
    everything they name is in place; objects under ``url`` that the folder does not hold (left
    by an earlier run) are deleted after that, where the store can list. So a reader that starts
    from the index sees the old dataset whole or the new one whole, except that an object the new
    dataset dropped can vanish under a reader still holding the old index.

    Returns:
        The number of objects written.

    Raises:
        InvalidInputError: naming ``out_dir``, when the store refuses a write.
    """
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    store, base = locate(url.rstrip("/") + "/", "out_dir")
    last = [name for name in files if name in index]
    first = [name for name in files if name not in index]

    def upload(name: str) -> None:
        with (folder / name).open("rb") as file:
            store.upload(base + name, file)

    try:
        with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
            list(pool.map(upload, first))
        for name in last:
            upload(name)
    except Exception as exc:
        error = output_error(store, url, "out_dir", exc)
        if error is None:
            raise
        raise error from None
    _delete_stale(store, base, set(files))
    return len(files)


def _delete_stale(store: Store, base: str, keep: set[str]) -> None:
    """Delete objects under ``base`` that are not in ``keep`` (nothing where the store cannot list)."""
    try:
        listed = list(store.list(base, recursive=True, page_size=LIST_PAGE_SIZE))
    except NotImplementedError:
        return
    for rel in listed:
        if rel[len(base) :] not in keep:
            store.delete(rel)
