"""Where images are read from and outputs written to: local folders, object stores, Prefect blocks.

A *source* names images; a *reference* (``ref``) names one image. References are plain strings
that never hold a credential, so they pickle to any task process, which re-creates its own
storage client from configuration and reads the bytes itself.

Sources, and the references they expand to:

- a local path, folder (its image files, not recursive) or glob (``**`` recursive):
  ``photos/``, ``photos/**/*.jpg`` → ``photos/a.jpg``; ``file:///data/photos/`` → ``file:///data/photos/a.jpg``
- an S3 URL: ``s3://bucket/prefix/`` (the images directly under the prefix), ``s3://bucket/photos/**/*.jpg``,
  ``s3://bucket/key.jpg`` → ``s3://bucket/photos/a.jpg``. Credentials and endpoint come from the
  standard AWS configuration (``AWS_ACCESS_KEY_ID``…, ``AWS_PROFILE``, ``~/.aws``, ``AWS_ENDPOINT_URL``
  for S3-compatible servers) or from a prefect-aws ``AwsCredentials``/``MinIOCredentials`` block
  passed as ``credentials``. Listing streams pages of ``list_objects_v2`` (s3fs's ``find``/``ls``
  collect and sort a whole listing first, so they are not used).
- any other URL whose scheme fsspec knows (``gs://``, ``az://``, ``memory://``…), configured the
  way that fsspec backend is; listed one directory at a time.
- a saved Prefect file-system block plus a path: ``block://<block-type-slug>/<block-name>/<path>``,
  e.g. ``block://s3-bucket/my-photos/2024/`` (an ``S3Bucket``, paths relative to its
  ``bucket_folder``), ``block://remote-file-system/name/...``, ``block://local-file-system/name/...``;
  `block_source` builds it from a block object. Task processes load the block by name.

In a list of sources, an element is expanded when it ends with ``/`` or holds a wildcard (or is a
local folder) and is otherwise taken as one object without a request, so a vanished one becomes a
failed row; a single source string is checked (a missing object or bucket is an error). ``http(s)://``
references pass through unchanged (downloaded elsewhere). Order is stable: full-path
(key) order, as S3 lists. Outputs (`write_bytes`, `AtomicParquetWriter`) appear whole or not at
all: a local temp file renamed into place (mode from the umask), one S3 PUT or completed multipart
upload, one object upload elsewhere. The storage systems are in `stores`; which one holds a reference,
in `locate`.

Examples:
    ```python
    refs = iter_refs("s3://photos/2024/**/*.jpg")  # lazy: one page of keys at a time
    data = read_bytes(next(refs))  # in the task process
    write_bytes(join("s3://results/run-1/", "a.jpg"), data)
    ```
"""

from .access import check_output, delete, is_remote, join, list_files, read_bytes, write_bytes
from .listing import IMAGE_SUFFIXES, VIDEO_SUFFIXES, block_source, count_refs, iter_refs
from .locate import BLOCK_SCHEME
from .parquet import AtomicParquetWriter, write_whole
from .stores import LIST_PAGE_SIZE

__all__ = [
    "BLOCK_SCHEME",
    "IMAGE_SUFFIXES",
    "LIST_PAGE_SIZE",
    "VIDEO_SUFFIXES",
    "AtomicParquetWriter",
    "block_source",
    "check_output",
    "count_refs",
    "delete",
    "is_remote",
    "iter_refs",
    "join",
    "list_files",
    "read_bytes",
    "write_bytes",
    "write_whole",
]
