"""Which store holds a reference, and the per-process clients and blocks behind the stores.

`locate` turns a reference string (a local path, ``file://``, ``s3://``, any fsspec URL, or
``block://<block-type-slug>/<block-name>/<path>``) into a `Store` and the path in it. References
never hold credentials (`locate` rejects a URL that does): each process makes its own S3 client from
the standard AWS configuration or a credentials block, and loads a block by name, once per process.

Examples:
    ```python
    store, rel = locate("s3://photos/2024/a.jpg", "images")  # (S3Store for bucket 'photos', '2024/a.jpg')
    split_url("photos/a.jpg")  # ('', 'photos/a.jpg')
    ```
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from prefect.plugins import load_prefect_collections
from prefect.utilities.dispatch import get_registry_for_type

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .stores import BlockStore, FsspecStore, LocalStore, S3Store, Store

__all__ = ["BLOCK_SCHEME", "MAGIC", "locate", "split_url"]

BLOCK_SCHEME = "block"
#: Schemes a flow downloads over HTTP itself: passed through by listing, never read from storage.
WEB_SCHEMES = frozenset({"http", "https"})
#: A glob wildcard character.
MAGIC = re.compile(r"[*?\[]")
_SLUG = re.compile(r"[a-z0-9-]+")


# --- clients, per process -------------------------------------------------------------------------

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], Any] = {}
#: Environment that selects the S3 client's configuration (the secret key is not part of the key).
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _cached(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """One object per process and key: clients are made afresh in each task process."""
    key = (os.getpid(), *key)
    with _LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = make()
        return _CLIENTS[key]


def _s3_client(credentials: Any, field: str) -> Any:
    if credentials is not None:
        return credentials.get_s3_client()  # prefect-aws caches it per process and block
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise InvalidInputError(field, "s3:// needs the s3 extra: pip install 'prefect-roboflow[s3]'") from None
    config = Config(
        connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 4}, max_pool_connections=16
    )
    env = tuple(os.environ.get(name) for name in _AWS_ENV)
    return _cached(("s3", env), lambda: boto3.session.Session().client("s3", config=config))


def _load_block(slug: str, name: str, field: str) -> Any:
    from prefect.blocks.core import Block
    from prefect.exceptions import ObjectNotFound

    try:
        return _cached(("block", slug, name), lambda: Block.load(f"{slug}/{name}", _sync=True))  # type: ignore[call-arg]
    except (ObjectNotFound, ValueError, KeyError):
        raise InvalidInputError(field, f"no saved block {slug}/{name}") from None


# --- parsing --------------------------------------------------------------------------------------


def split_url(ref: str) -> tuple[str, str]:
    """``(scheme, rest)`` of ``scheme://rest``; ``("", ref)`` for a local path."""
    scheme, sep, rest = ref.partition("://")
    return (scheme.lower(), rest) if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else ("", ref)


def _reject_userinfo(scheme: str, rest: str, field: str) -> None:
    authority = rest.split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]
    if userinfo and (scheme in {"s3", "s3a"} or ":" in userinfo):
        raise InvalidInputError(
            field, f"credentials in a {scheme}:// URL are not accepted: use the store's configuration or a block"
        )


def locate(ref: str, field: str, credentials: Any = None) -> tuple[Store, str]:
    """The store holding ``ref`` and the path of ``ref`` in it."""
    scheme, rest = split_url(ref)
    if not scheme:
        return LocalStore(), ref
    _reject_userinfo(scheme, rest, field)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in {"", "localhost"}:
            raise InvalidInputError(field, f"file:// URLs name this machine, not {host!r}")
        return LocalStore(ref_base=f"file://{host}"), "/" + path
    if scheme in {"s3", "s3a"}:
        bucket, _, key = rest.partition("/")
        if not bucket or MAGIC.search(bucket):
            raise InvalidInputError(field, f"{scheme}:// URLs need a bucket name without wildcards")
        return S3Store(_s3_client(credentials, field), bucket, f"{scheme}://{bucket}/"), key
    if scheme == BLOCK_SCHEME:
        return _locate_block(rest, field)
    return _fsspec_store(scheme, ref, field)


def _fsspec_store(scheme: str, ref: str, field: str) -> tuple[Store, str]:
    import fsspec
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise InvalidInputError(field, f"unknown URL scheme {scheme!r}")
    try:
        fs = fsspec.filesystem(scheme)
    except ImportError:
        hint = known_implementations.get(scheme, {}).get("err", "its fsspec backend is not installed")
        raise InvalidInputError(field, f"{scheme}:// is not available here: {hint}") from None
    rel = fs._strip_protocol(ref)
    rel = rel + "/" if ref.endswith("/") and not rel.endswith("/") else rel
    return FsspecStore(fs, f"{scheme}://"), rel


def _locate_block(rest: str, field: str) -> tuple[Store, str]:
    slug, _, tail = rest.partition("/")
    name, _, rel = tail.partition("/")
    if not (_SLUG.fullmatch(slug) and _SLUG.fullmatch(name)):
        raise InvalidInputError(field, "expected block://<block-type-slug>/<block-name>/<path>")
    block = _load_block(slug, name, field)
    ref_base = f"{BLOCK_SCHEME}://{slug}/{name}/"
    if slug == "s3-bucket":
        folder = (block.bucket_folder or "").strip("/")
        client = block.credentials.get_s3_client()
        return S3Store(client, block.bucket_name, ref_base, folder + "/" if folder else ""), rel
    if slug == "local-file-system":
        base = str(Path(block.basepath or ".").expanduser()) + "/"
        return LocalStore(ref_base, base), rel
    if slug == "remote-file-system":
        fs = block.filesystem
        return FsspecStore(fs, ref_base, fs._strip_protocol(block.basepath).rstrip("/") + "/"), rel
    return BlockStore(block, ref_base), rel


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
