"""What a flow's parameters name, resolved and checked before any request: the server, the
models, the cache and the output folder. Each check raises `InvalidInputError` naming the parameter."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, TypeAlias, get_args

from prefect.blocks.core import Block
from prefect.filesystems import WritableFileSystem
from prefect.plugins import load_prefect_collections
from prefect.settings import PREFECT_HOME
from prefect.utilities.dispatch import get_registry_for_type

from prefect_roboflow.blocks import InferenceServer, ModelBlock, OwlV2, model_class
from prefect_roboflow.blocks._embedding import EmbeddingModel
from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.blocks.server import normalise_api_urls

from ._cache import ContentCache
from ._locate import split_url
from ._storage import check_output

__all__ = [
    "DEFAULT_SERVER_URL",
    "EmbeddingFamily",
    "ServerSpec",
    "check_index",
    "is_index",
    "detector_model",
    "embedding_model",
    "ensure_out_dir",
    "resolve_cache",
    "resolve_out_dir",
    "resolve_server",
]

#: The ``model`` parameter of the flows: the ``family`` of an embedding block.
EmbeddingFamily = Literal["clip", "perception_encoder"]
DEFAULT_SERVER_URL = "http://localhost:9001"
CacheStorage = str | ContentCache | None
#: A flow's ``server`` parameter: a saved block name, a URL, a list of URLs, a block, or None.
ServerSpec: TypeAlias = str | list[str] | InferenceServer | None


def resolve_server(server: ServerSpec) -> InferenceServer:
    """An `InferenceServer` from a block, a saved block name, a URL, or a list of URLs.

    ``None`` means the ``INFERENCE_SERVER_URL`` environment variable, then
    ``http://localhost:9001``. A list of URLs names interchangeable servers that share the load
    (see `InferenceServer`).

    Raises:
        InvalidInputError: naming ``server``, for a URL or list of URLs that is malformed (empty,
            a server twice, not http(s), a query string), before any request.

    Examples:
        ```python
        resolve_server(["http://gpu-a:9001", "http://gpu-b:9001"]).api_urls
        # ('http://gpu-a:9001', 'http://gpu-b:9001')
        resolve_server([])  # InvalidInputError: server: expected at least one server URL, got an empty list
        ```
    """
    if isinstance(server, InferenceServer):
        return server
    if server is None:
        server = os.environ.get("INFERENCE_SERVER_URL") or DEFAULT_SERVER_URL
    if not isinstance(server, str) or "://" in server:
        return InferenceServer(api_url=_server_urls(server))
    name = server.split("/", 1)[1] if server.startswith("roboflow-inference-server/") else server
    return InferenceServer.load(name, _sync=True)  # sync even inside an async flow


def _server_urls(server: object) -> str | list[str]:
    """The checked URL or URLs of a ``server`` parameter (see `normalise_api_urls`)."""
    if not isinstance(server, (str, list, tuple)) or not all(isinstance(url, str) for url in server):
        raise InvalidInputError("server", f"expected a URL, a list of URLs or a block, got {server!r:.200}")
    try:
        return normalise_api_urls(server)
    except ValueError as error:
        raise InvalidInputError("server", str(error)) from None


def embedding_model(family: str, version: str | None, server: InferenceServer) -> EmbeddingModel:
    """The embedding block of a family (``"clip"``, ``"perception_encoder"``), at its default version
    unless one is given."""
    if family not in get_args(EmbeddingFamily):
        raise InvalidInputError("model", f"expected one of {list(get_args(EmbeddingFamily))}, got {family!r}")
    cls = model_class(family)
    model = cls(server=server) if version is None else cls(server=server, version=version)
    assert isinstance(model, EmbeddingModel)
    return model


def detector_model(version: str | None, server: InferenceServer) -> OwlV2:
    """The OWLv2 block, at its default version unless one is given."""
    return OwlV2(server=server) if version is None else OwlV2(server=server, version=version)


def _is_block_slug(value: str) -> bool:
    """``"block-type/name"`` of a registered block type, and no path that exists."""
    match = re.fullmatch(r"([a-z0-9-]+)/([\w-]+)", value)
    if match is None or Path(value).expanduser().exists():
        return False
    if match.group(1) not in (get_registry_for_type(Block) or {}):
        # A worker's flow-run process has imported no collection yet: register their block types
        # (prefect-aws's s3-bucket…), or "s3-bucket/cache" would silently become a local folder.
        load_prefect_collections()
    return match.group(1) in (get_registry_for_type(Block) or {})


def resolve_cache(cache_storage: CacheStorage) -> ContentCache:
    """The per-item content cache of a flow.

    ``cache_storage`` is a folder (absolute or relative, existing or not), or a saved
    `WritableFileSystem` block as ``"block-type-slug/name"`` of a registered block type (e.g.
    ``"s3-bucket/cache"``); ``None`` means ``$PREFECT_HOME/prefect-roboflow-cache``.
    """
    if isinstance(cache_storage, ContentCache):
        return cache_storage
    if cache_storage is not None and _is_block_slug(cache_storage):
        block = Block.load(cache_storage, _sync=True)  # type: ignore[call-arg]
        if not isinstance(block, WritableFileSystem):
            raise InvalidInputError("cache_storage", f"{cache_storage} is not a writable file system block")
        return ContentCache(block)
    folder = Path(cache_storage) if cache_storage else Path(PREFECT_HOME.value()) / "prefect-roboflow-cache"
    return ContentCache(folder.expanduser().resolve())


def is_index(path: str) -> bool:
    """Whether ``path`` (a folder or an object-storage URL) holds a vector index, not a table."""
    if path.endswith(".parquet"):
        return False
    import fsspec

    from .vector_index import MANIFEST

    fs, root = fsspec.core.url_to_fs(path)
    return bool(fs.exists(f"{root.rstrip('/')}/{MANIFEST}"))


def check_index(index_path: str | None, model: ModelBlock) -> None:
    """Open (or create) the vector index a run will add to, before any request, and refuse one
    that holds another model's or version's rows.

    Raises:
        InvalidInputError: naming ``index_path``.
    """
    if index_path is None:
        return
    from .vector_index import VectorIndex

    try:
        index = VectorIndex.open(index_path, create=True)
    except InvalidInputError as error:
        raise InvalidInputError("index_path", error.reason) from None
    if index.family is not None and (index.family, index.version) != (model.family, model.version):
        raise InvalidInputError(
            "index_path", f"holds {index.family} {index.version} rows; this run embeds with {model.label}"
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
