"""A flow's outputs as Prefect assets: every table, dataset folder, index and annotated-output
location it wrote is materialised once the run has written it, with the image source as upstream.

Prefect (3.4.5+) emits ``prefect.asset.materialization.succeeded`` for each asset a task created
with `prefect.assets.materialize` completes, and ``prefect.asset.referenced`` for its
``asset_deps``; a *cached* task run emits nothing. So the materialisation here is its own uncached
task, run from the flow after the outputs are written (`BatchRun.finish`): a fully cached rerun,
which rewrites its outputs, still records them. Automations on a self-hosted server can match
these events; the lineage graph is a Prefect Cloud view.

Keys are the storage URIs (`asset_key`): ``file://`` + the absolute path for a local location,
the URL as given otherwise (``s3://…``, ``block://…``). Where the location holds characters
Prefect refuses in a key (whitespace, ``# ? & % " ' < > [ ] { } |``) or ``~``, they are replaced by
``_`` and ``~`` + the first 12 hex digits of the sha256 of the location (as above, before the
replacement) is appended, so ``/data/run 1/x`` and ``/data/run_1/x`` are two assets; a key over
512 characters is cut to a prefix plus ``~`` and a hash of the whole. A key holds ``~`` only when
one of these happened, so keys of different locations differ.

Metadata: the flow, the run's images, rows and failed rows, the models (``model``/``version`` of
the embedding step), and for a local parquet table its own row count and schema.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._storage.access import is_remote

__all__ = ["HASH_DIGITS", "MAX_KEY_LENGTH", "asset_key", "assets_section", "materialize_outputs", "output_locations"]

MAX_KEY_LENGTH = 512
#: What Prefect refuses in a key, and ``~``: the mark of a key with a hash appended.
_REFUSED = re.compile(r"[\s\0#?&%\"'<>\[\]{}|~]")
#: Hex digits of the location's sha256 appended where characters were replaced.
HASH_DIGITS = 12
#: Upstream assets named for a list of image references at most (their folders).
MAX_UPSTREAM = 20


def asset_key(location: str) -> str:
    """The asset key of a storage location (see the module docs).

    Examples:
        >>> asset_key("s3://bucket/run/labels.parquet")
        's3://bucket/run/labels.parquet'
        >>> asset_key("/data/run_1/embeddings.parquet")
        'file:///data/run_1/embeddings.parquet'
        >>> asset_key("/data/run 1/embeddings.parquet")
        'file:///data/run_1/embeddings.parquet~1b677b983a17'
    """
    if "://" not in location:
        location = "file://" + os.path.abspath(os.path.expanduser(location))
    scheme, rest = location.split("://", 1)
    location = f"{scheme.lower()}://{rest}".rstrip("/")
    key = _REFUSED.sub("_", location)
    if key != location:
        key += "~" + hashlib.sha256(location.encode()).hexdigest()[:HASH_DIGITS]
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = f"{key[: MAX_KEY_LENGTH - 17]}~{digest}"
    return key


def output_locations(result: Mapping[str, Any], parameters: Mapping[str, Any]) -> list[str]:
    """The locations a flow run wrote: its result's ``*_path`` and ``*_dir`` fields, its
    ``datasets``, and the vector index it added to (``index_path``), in that order, once each."""
    found: list[str] = []
    for name, value in result.items():
        if isinstance(value, str) and value and (name.endswith("_path") or name.endswith("_dir")):
            found.append(value)
        elif name == "datasets" and isinstance(value, Mapping):
            found.extend(str(v) for v in value.values())
    index = parameters.get("index_path")
    if isinstance(index, str) and index and result.get("indexed", 0):
        found.append(index)
    return list(dict.fromkeys(found))


def _upstream(images: Any) -> list[str]:
    """The image source as upstream asset keys: the source itself, or a list's folders."""
    if isinstance(images, str):
        return [asset_key(images)]
    if not isinstance(images, Sequence):
        return []
    folders = dict.fromkeys(asset_key(str(ref).rsplit("/", 1)[0] or "/") for ref in images)
    return list(folders)[:MAX_UPSTREAM]


def _table_facts(location: str) -> dict[str, Any]:
    """A local parquet table's row count and schema (read from its footer); nothing otherwise."""
    if is_remote(location) or not location.endswith(".parquet") or not Path(location).is_file():
        return {}
    import pyarrow.parquet as pq

    meta = pq.read_metadata(location)
    schema = meta.schema.to_arrow_schema()
    return {"table_rows": meta.num_rows, "schema": {f.name: str(f.type) for f in schema}}


def _models(step_models: Iterable[str]) -> dict[str, Any]:
    labels = [m for m in dict.fromkeys(step_models) if m]
    facts: dict[str, Any] = {"models": labels}
    embedding = next((m for m in labels if m.split(" ", 1)[0] in {"clip", "perception_encoder"}), None)
    if embedding:
        facts["model"], _, facts["version"] = embedding.partition(" ")
    return facts


async def materialize_outputs(
    flow_key: str,
    locations: Sequence[str],
    images: Any,
    figures: Mapping[str, Any],
    step_models: Iterable[str],
) -> list[str]:
    """Materialise ``locations`` as assets of this flow run (upstream: ``images``); their keys.

    ``figures`` (images, rows, failed…) go into every asset's metadata. Nothing happens for no
    locations; outside a flow run the task still runs (Prefect then emits from the task alone).
    """
    if not locations:
        return []
    from prefect.assets import Asset, add_asset_metadata, materialize
    from prefect.cache_policies import NO_CACHE

    keys = [asset_key(location) for location in locations]
    metadata = {"flow": flow_key, **dict(figures), **_models(step_models)}
    facts = {key: _table_facts(location) for key, location in zip(keys, locations, strict=True)}

    # An async task: it runs on the flow run's own async client (a sync one called from the async
    # flow would open a client of its own, ~20 ms of CPU for its TLS context).
    async def record() -> list[str]:
        for key in keys:
            add_asset_metadata(key, {**metadata, **facts[key]})
        return keys

    task = materialize(
        *[Asset(key=key) for key in keys],
        asset_deps=[Asset(key=key) for key in _upstream(images)],
        name=f"{flow_key}-assets",
        task_run_name=f"{flow_key}-assets",  # one name in the UI, as the batch tasks have
        cache_policy=NO_CACHE,
        persist_result=False,
    )(record)
    return await task()


def assets_section(keys: Sequence[str]) -> str:
    """The summary's list of the run's assets (local ones as links)."""
    lines = [f"- [{key}]({key})" if key.startswith("file://") else f"- `{key}`" for key in keys]
    return "## Assets\n\n" + "\n".join(lines)
