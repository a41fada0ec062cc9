"""Where a flow writes, and the index it adds to, resolved and checked before any request. Each
check raises `InvalidInputError` naming the parameter."""

from __future__ import annotations

import os
from pathlib import Path

from prefect_roboflow.blocks import EmbeddingModel, ModelBlock
from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._storage.access import check_output
from .._storage.locate import split_url


def check_index(index_path: str | None, model: ModelBlock) -> None:
    """Open (or create) the vector index a run will add to, before any request, and refuse one
    that holds another model's or version's rows.

    Raises:
        InvalidInputError: naming ``index_path``.
    """
    if index_path is None:
        return
    from ..vector_index import VectorIndex

    try:
        index = VectorIndex.open(index_path, create=True)
    except InvalidInputError as error:
        raise InvalidInputError("index_path", error.reason) from None
    if index.family is not None and (index.family, index.version) != (model.family, model.version):
        raise InvalidInputError(
            "index_path", f"holds {index.family} {index.version} rows; this run embeds with {model.label}"
        )
    dim = index.dim
    if dim and isinstance(model, EmbeddingModel) and model.learn_dimension(dim) != dim:
        raise InvalidInputError(
            "index_path", f"holds {dim}-value rows; {model.label} embeddings have {model.dimension}"
        )


def ensure_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder, created.

    Raises:
        InvalidInputError: naming ``out_dir``, when it is a file or cannot be created.
    """
    path = Path(out_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InvalidInputError("out_dir", f"{out_dir} exists and is not a folder") from None
    except OSError as exc:
        raise InvalidInputError("out_dir", f"cannot create {out_dir}: {exc.strerror}") from None
    return path


def resolve_out_dir(out_dir: str | os.PathLike[str]) -> str:
    """Where a flow writes its outputs, checked before any request; output names are joined onto
    it with `_storage.join`.

    ``out_dir`` is a local folder (made absolute and created, as `ensure_out_dir` does; also as a
    ``file://`` URL) or an object-store location: ``s3://bucket/prefix/`` (the standard AWS
    configuration, ``AWS_ENDPOINT_URL`` included), any fsspec URL (``gs://``, ``az://``…), or a
    saved file-system block plus a path, ``block://s3-bucket/<name>/<prefix>``. A bucket is checked
    with one request; nothing is created in it until the run writes.

    Raises:
        InvalidInputError: naming ``out_dir``: a file, a folder that cannot be created, a bucket
            that does not exist or cannot be reached, no credentials, an unknown or read-only URL
            scheme, credentials in the URL.

    Examples:
        ```python
        resolve_out_dir("out/run-1")  # '/home/me/project/out/run-1'
        resolve_out_dir("s3://results/run-1/")  # 's3://results/run-1/'
        ```
    """
    location = os.fspath(out_dir)
    scheme, rest = split_url(location)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in {"", "localhost"}:
            raise InvalidInputError("out_dir", f"file:// URLs name this machine, not {host!r}")
        return str(ensure_out_dir("/" + path))
    if not scheme:
        return str(ensure_out_dir(location))
    if scheme in {"http", "https"}:
        raise InvalidInputError("out_dir", f"{scheme}:// URLs cannot be written to: give a folder or a bucket")
    check_output(location, field="out_dir")
    return location
